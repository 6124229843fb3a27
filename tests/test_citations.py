"""Every reference in the repository can be opened by its readers.

Comments, docstrings and documentation point at docs/method.md (``docs/method.md#<anchor>``), the paper or the
original repository, never at the private method specification, at its quirk numbers (a capital Q and a number), or
at issue numbers of a tracker readers cannot see. Two checks:

* no line of a tracked text file (Python, Markdown, shell, notebooks, JSON5, TOML, Makefiles) cites the
  specification, a quirk number or an issue number; the quirk headings of docs/method.md, which define the anchors
  the code links to, are the one exception;
* every ``docs/method.md#<anchor>`` link anywhere in the repository names a heading of docs/method.md.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SKIP_DIRS = {".venv", ".git", "runs"}
SUFFIXES = {".py", ".md", ".sh", ".ipynb", ".json5", ".toml", ".mk"}
NAMES = {"Makefile"}

# The patterns are spelled so that this file does not match them itself.
_CITATIONS = {
    "the private specification": re.compile(r"\bS[P]EC\b"),
    "a quirk number": re.compile(r"\bQ[0-9]+\b"),
    "an issue number": re.compile(r"\b[Ii]ssues?\s+#?[0-9]+\b"),
    # a hash and a number, e.g. in parentheses; not a CSS colour ("color: #222;") or an HTML entity
    "an issue number ": re.compile(r"(?<![\w&#/:])(?<!: )#[0-9]+\b(?![;\w])"),
}
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_METHOD_LINK = re.compile(r"(?<![\w.-])(?:docs/)?method\.md#([A-Za-z0-9_\-]+)")


def text_files() -> list[Path]:
    """The repository's text files of the checked kinds: tracked and new (not ignored) ones, else a directory walk."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode("utf-8", "replace")
        candidates = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        candidates = [p for p in ROOT.rglob("*") if p.is_file()]
    files = []
    for path in candidates:
        rel = path.relative_to(ROOT)
        if SKIP_DIRS & set(rel.parts) or "site-packages" in rel.parts or not path.is_file():
            continue
        if path.suffix in SUFFIXES or path.name in NAMES:
            files.append(path)
    return sorted(set(files))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: inline markup dropped, lower case, punctuation but '-' and '_' dropped, spaces
    to '-' (e.g. ``"Load-time normalisation"`` -> ``"load-time-normalisation"``)."""
    text = re.sub(r"`|\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def method_anchors() -> set[str]:
    """Anchors of every heading of docs/method.md (fenced code blocks ignored)."""
    text = _FENCE.sub("", METHOD.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for line in text.splitlines() if (m := _HEADING.match(line))}


def citations(path: Path) -> list[str]:
    """``file:line: what`` for every line of ``path`` that cites the specification, a quirk or an issue number."""
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        for what, pattern in _CITATIONS.items():
            if what == "a quirk number" and path == METHOD and _HEADING.match(line):
                continue  # the quirk headings of docs/method.md define the anchors
            if pattern.search(line):
                found.append(f"{rel}:{n}: {what.strip()}: {line.strip()[:100]}")
    return found


def test_helpers_on_hand_made_text() -> None:
    assert slug("Q" "9. Query range from ground truth") == "q9-query-range-from-ground-truth"
    assert slug("EP1-ALP") == "ep1-alp"
    assert slug("The `classmap_1.json` file, step 2") == "the-classmap_1json-file-step-2"
    cited = ["(S" "PEC 8.5)", "(Q" "27)", "since iss" "ue 12", "original is" "sue #" "44", "runs differ (#" "51)"]
    clean = ["RUN_S" "PECIFIC", "Q-Net", "color: #222;", "&#8211;", "HTML #1f77b4", "# 1. comment", "issues"]
    for text in cited:
        assert any(p.search(text) for p in _CITATIONS.values()), text
    for text in clean:
        assert not any(p.search(text) for p in _CITATIONS.values()), text
    assert _METHOD_LINK.findall("see docs/method.md#ep2 and [a](method.md#folds), not xmethod.md#x") == ["ep2", "folds"]


def test_no_unreadable_citations() -> None:
    files = text_files()
    assert METHOD in files and Path(__file__).resolve() in files
    found = [hit for path in files for hit in citations(path)]
    assert not found, ("lines cite the private specification, a quirk number or an issue number; link "
                       "docs/method.md#<anchor>, the paper or the original repository instead:\n" + "\n".join(found))


def test_method_links_resolve() -> None:
    anchors = method_anchors()
    broken = []
    for path in text_files():
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            broken += [f"{rel}:{n}: #{a}" for a in _METHOD_LINK.findall(line) if a not in anchors]
    assert not broken, "links to docs/method.md name no heading there:\n" + "\n".join(broken)
