"""Tests for util/atomic.py: a file or folder appears complete under its name, or the old one stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from util.atomic import atomic_file, atomic_folder, write_text


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_text(target, "old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_file(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith("a.json") and tmp.name.startswith(".tmp-")
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    with atomic_file(target, durable=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_folder_swaps_whole_folders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "1.txt").write_text("first")
    assert [p.name for p in out.iterdir()] == ["1.txt"]
    with pytest.raises(ValueError):
        with atomic_folder(out) as tmp:
            (tmp / "2.txt").write_text("second")
            raise ValueError("stop")
    assert [p.name for p in out.iterdir()] == ["1.txt"]  # untouched
    with atomic_folder(out) as tmp:
        (tmp / "2.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["2.txt"]  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


# ----------------------------------------------------------------------------------------------------------------
# Every writer of the project goes through util/atomic.py: a call that writes a file must sit inside
# ``with atomic_file(...)`` or ``with atomic_folder(...)``.
REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("util", "dataloaders", "models", "data_preprocessing", "evaluation", "engine", "prediction", "launch",
           "bench")
WRITE_METHODS = {"write_text", "write_bytes", "savefig", "WriteImage", "save", "to_csv", "tofile"}
# (file, function) that may write in place, each for a reason: scratch inputs in a TemporaryDirectory deleted
# afterwards (bench), a lock file held open for its flock (resume), append-only logs of running subprocesses (sweep)
ALLOWED = {("bench/prediction.py", "_write"), ("bench/prediction.py", "measure_predict"),
           ("engine/resume.py", "claim_run_dir"), ("launch/runs.py", "_call"), ("launch/runs.py", "execute")}


def _writes_outside_atomic(path: Path) -> list[str]:
    """``file:line call`` of every write call in ``path`` not lexically inside an atomic_file/atomic_folder block."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    found: list[str] = []

    def is_atomic(item: ast.withitem) -> bool:
        call = item.context_expr
        return isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) in (
            "atomic_file", "atomic_folder")

    def visit(node: ast.AST, inside: bool, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, (ast.With, ast.AsyncWith)) and any(is_atomic(i) for i in node.items):
            inside = True
        if isinstance(node, ast.Call) and not inside and (rel, function) not in ALLOWED:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
            mode = next((k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)),
                        mode)
            if (isinstance(f, ast.Attribute) and name in WRITE_METHODS) or (
                    name == "open" and isinstance(mode, str) and any(c in mode for c in "wax")):
                found.append(f"{rel}:{node.lineno} {ast.unparse(node)[:80]}")
        for child in ast.iter_child_nodes(node):
            visit(child, inside, function)

    visit(tree, False, "")
    return found


def test_the_checker_finds_a_write_outside_an_atomic_block(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from util.atomic import atomic_file\n"
                     "def f(p, fig):\n    with atomic_file(p) as tmp:\n        fig.savefig(tmp)\n"
                     "    p.write_text('x')\n    open(p, 'w')\n    open(p)\n")
    found = _writes_outside_atomic(probe)
    assert [x.split(" ", 1)[0].rsplit(":", 1)[1] for x in found] == ["5", "6"]


def test_every_product_writer_goes_through_util_atomic() -> None:
    offenders = [x for pkg in PRODUCT for p in sorted((REPO / pkg).rglob("*.py"))
                 if p.name != "atomic.py" for x in _writes_outside_atomic(p)]
    offenders += [x for p in sorted(REPO.glob("*.py")) for x in _writes_outside_atomic(p)]
    assert not offenders, "write without util.atomic:\n" + "\n".join(offenders)
