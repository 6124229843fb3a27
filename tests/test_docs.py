"""Checks of the documentation: README.md is the front door, docs/*.md hold the details.

Every relative link (and image) in README.md, data/README.md and docs/*.md must point at an existing file, a link
with a ``#fragment`` must name a heading of its target page, every docs page must be linked from README.md, README.md
stays short, and a reference to a README section in the sources (README, a comma, then the heading in double quotes)
must name a heading that README.md still has.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_README_REF = re.compile(r"README(?:\.md)?(?:,| section) \"([^\"]+)\"")


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images of ``text``, outside code blocks and code spans.

    Args:
        text: Markdown source.

    Returns:
        The link targets in order of appearance (URLs included).
    """
    text = _INLINE_CODE.sub("", _FENCE.sub("", text))
    return _LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.

    Args:
        heading: the heading text without the leading ``#``.

    Returns:
        The fragment GitHub generates, e.g. ``"When something goes wrong"`` -> ``"when-something-goes-wrong"``.
    """
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """All heading anchors of a Markdown page (fenced code blocks ignored)."""
    return {slug(h) for h in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8")))}


def test_helpers_on_hand_made_text() -> None:
    text = (
        "See [a](docs/a.md), ![img](b.png 'x') and [c](docs/c.md#part-two).\n"
        "`[not](a_link.md)` and <https://x.org>, [web](https://example.org).\n"
        "```\n[inside](fence.md)\n# not a heading\n```\n"
    )
    assert links(text) == ["docs/a.md", "b.png", "docs/c.md#part-two", "https://example.org"]
    assert slug("When something goes wrong") == "when-something-goes-wrong"
    assert slug("Running the paper's experiments on a GPU") == "running-the-papers-experiments-on-a-gpu"
    assert slug("Fast evaluation (`evaluation/predictors.py`)") == "fast-evaluation-evaluationpredictorspy"
    assert slug("CHAOS T2-SPIR (`CHAOST2`)") == "chaos-t2-spir-chaost2"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{fragment})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_readme() -> None:
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(readme.read_text(encoding="utf-8"))}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages not linked from README.md: {orphans}"


def test_readme_stays_short() -> None:
    n_lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n_lines <= 250, f"README.md has {n_lines} lines; move details into a docs/ page"


def test_readme_section_references_exist() -> None:
    readme_anchors = anchors(ROOT / "README.md")
    stale = []
    for pattern in ("*.py", "*.sh", "*.json5", "*.md", "*.mk", "Makefile", "*.ipynb"):
        for f in ROOT.rglob(pattern):
            rel = f.relative_to(ROOT)
            if rel.parts[0] in {".venv", "runs", ".git"} or "site-packages" in rel.parts:
                continue
            for section in _README_REF.findall(f.read_text(encoding="utf-8", errors="replace")):
                if slug(section) not in readme_anchors:
                    stale.append(f"{rel}: README section {section!r}")
    assert not stale, f"references to README sections that no longer exist: {stale}"
