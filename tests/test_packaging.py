"""pyproject.toml declares what the code imports and imports what it declares; requirements.txt (``make setup``)
lists the same; the environment meets the bounds.

The imports are read with :mod:`ast` from every Python file of the repository (each package, the top-level scripts,
the tests, the benchmarks) and from the code cells of the notebooks, function-level imports included.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement

from tests.reliability_fixtures import REPO

_NOT_SOURCE = {".venv", "venv", "data", "runs", "build", "dist", "__pycache__", "node_modules"}

# Declared but never imported, each for a reason; every other declared distribution must be imported somewhere.
NOT_IMPORTED = {
    "setuptools": "sacred 0.8.7 imports pkg_resources, which setuptools 81+ no longer ships (the <81 bound)",
    "ipykernel": "the Jupyter kernel that nbclient starts to run the notebook in tests/test_notebooks.py",
    "ruff": "a command-line tool: `ruff check .` in .ci/run and `make lint`",
    "import-linter": "a command-line tool: `lint-imports` checks the layer contracts of pyproject.toml",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements_txt() -> list[Requirement]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _key(req: Requirement) -> tuple[str, str]:
    return _norm(req.name), str(req.specifier)


def _runtime() -> set[str]:
    return {_norm(Requirement(r).name) for r in _pyproject()["project"]["dependencies"]}


def _declared() -> set[str]:
    project = _pyproject()["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return {_norm(Requirement(r).name) for r in project["dependencies"] + extras}


def first_party() -> set[str]:
    """Top-level import names of the repository: its folders holding Python files and its top-level modules."""
    names = {p.stem for p in REPO.glob("*.py")}
    for folder in REPO.iterdir():
        if folder.is_dir() and folder.name not in _NOT_SOURCE and not folder.name.startswith(".") \
                and any(folder.glob("*.py")):
            names.add(folder.name)
    return names


def source_files() -> list[Path]:
    """Every ``.py`` and ``.ipynb`` file of the repository, virtual environments and data left out."""
    out = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in _NOT_SOURCE and not d.startswith(".")]  # not walked
        out += [Path(folder) / f for f in files if f.endswith((".py", ".ipynb"))]
    return sorted(out)


def _code(path: Path) -> str:
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    # IPython magics and shell escapes are not Python: blank them out
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for c in cells if c["cell_type"] == "code"
                     for line in "".join(c["source"]).splitlines())


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports of one file, at any depth (function-level, conditional)."""
    names = set()
    for node in ast.walk(ast.parse(_code(path), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@cache
def third_party_imports() -> dict[str, set[Path]]:
    """Third-party top-level module -> the files that import it."""
    ours = first_party()
    found: dict[str, set[Path]] = {}
    for path in source_files():
        for name in imported_modules(path):
            if name not in sys.stdlib_module_names and name not in ours and name != "__future__":
                found.setdefault(name, set()).add(path)
    return found


@cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution_of(module: str) -> str:
    """The installed distribution that provides a top-level module (its own name when none is installed)."""
    dists = _providers().get(module, [module])
    return _norm(dists[0])


# ---------------------------------------------------------------------------------------------------- the tests
def test_the_scan_covers_every_package_and_finds_function_level_imports(tmp_path: Path) -> None:
    scanned = {p.relative_to(REPO).parts[0] for p in source_files()}
    packages = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert packages | {"bench", "tests", "training.py", "validation.py", "predict.py", "config_ssl_upload.py"} \
        <= scanned
    assert any(p.suffix == ".ipynb" for p in source_files())
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom a.b import c\n\ndef f():\n    import zz.y as q\n    if 1:\n"
                      "        from ww import v\nfrom . import local\n")
    assert imported_modules(sample) == {"os", "a", "zz", "ww"}
    imports = third_party_imports()
    assert REPO / "dataloaders" / "niftiio.py" in imports["nibabel"]  # imported inside a function
    assert "torch" in imports and "numpy" in imports and not set(imports) & first_party()


def test_every_imported_distribution_is_declared() -> None:
    declared, runtime = _declared(), _runtime()
    listed = {_norm(r.name) for r in _requirements_txt()}
    for module, files in sorted(third_party_imports().items()):
        dist = distribution_of(module)
        where = ", ".join(sorted(str(p.relative_to(REPO)) for p in files)[:3])
        assert dist in declared, f"{module} ({dist}) is imported by {where} but not declared in pyproject.toml"
        assert dist in listed, f"{module} ({dist}) is imported by {where} but not listed in requirements.txt"
        code = [p for p in files if p.suffix == ".py" and p.relative_to(REPO).parts[0] != "tests"]
        if code:  # the package code, the scripts, bench (notebooks run under the [dev] extra's Jupyter tools)
            where = ", ".join(sorted(str(p.relative_to(REPO)) for p in code)[:3])
            assert dist in runtime, f"{module} ({dist}) is imported by {where}: a runtime dependency, not an extra"


def test_every_declared_distribution_is_imported_or_has_a_reason() -> None:
    imported = {distribution_of(m) for m in third_party_imports()}
    declared = _declared()
    assert set(NOT_IMPORTED) <= declared  # the reasons name declared distributions
    assert not imported & set(NOT_IMPORTED), "imported now: remove it from NOT_IMPORTED"
    unused = sorted(declared - imported - set(NOT_IMPORTED))
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"


def test_requirements_txt_is_pyproject_dependencies_plus_every_extra() -> None:
    project = _pyproject()["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    declared = sorted({_key(r) for r in runtime + extras})  # an extra may repeat another's requirement
    listed = sorted(_key(r) for r in _requirements_txt())
    assert listed == declared  # same names, same version bounds, nothing twice
    assert len(set(listed)) == len(listed)
    assert len({name for name, _ in declared}) == len(declared)  # one bound per distribution everywhere
    assert set(project["optional-dependencies"]) >= {"dev"}
    dev = {_key(Requirement(r))[0] for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff", "nbformat", "nbclient", "ipykernel", "tensorboard", "packaging"} <= dev
    assert not dev & {_key(r)[0] for r in runtime}  # test tools are not runtime dependencies


def test_requires_python_matches_the_tools_and_this_interpreter() -> None:
    pyproject = _pyproject()
    spec = Requirement(f"python{pyproject['project']['requires-python']}").specifier
    assert "3.11" in spec and "3.10" not in spec  # tomllib and datetime.UTC are 3.11
    assert pyproject["tool"]["ruff"]["target-version"] == "py311"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in spec


def test_every_requirement_is_met_by_this_environment() -> None:
    # the bounds are the tested ones: the environment the tests run in must satisfy them
    for req in _requirements_txt():
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} outside {req.specifier}"
