"""pyproject.toml declares what ``pip install -e .[dev]`` needs, and requirements.txt (``make setup``) agrees."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement

from tests.reliability_fixtures import REPO


def _requirements_txt() -> list[Requirement]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _key(req: Requirement) -> tuple[str, str]:
    return re.sub(r"[-_.]+", "-", req.name).lower(), str(req.specifier)


def test_requirements_txt_is_pyproject_dependencies_plus_every_extra() -> None:
    project = _pyproject()
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    declared = sorted(_key(r) for r in runtime + extras)
    listed = sorted(_key(r) for r in _requirements_txt())
    assert listed == declared  # same names, same version bounds, nothing twice
    assert len(set(listed)) == len(listed)
    assert set(project["optional-dependencies"]) >= {"dev"}
    dev = {_key(Requirement(r))[0] for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff", "nbformat", "nbclient", "ipykernel"} <= dev
    assert not dev & {_key(r)[0] for r in runtime}  # test tools are not runtime dependencies


def test_every_requirement_is_met_by_this_environment() -> None:
    # the bounds are the tested ones: the environment the tests run in must satisfy them
    for req in _requirements_txt():
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} outside {req.specifier}"


def test_the_runtime_imports_are_declared() -> None:
    # third-party modules imported by the package code -> the distribution that provides them
    provided_by = {"torch": "torch", "torchvision": "torchvision", "sacred": "sacred", "json5": "json5",
                   "nibabel": "nibabel", "SimpleITK": "simpleitk", "skimage": "scikit-image",
                   "cv2": "opencv-python-headless", "numpy": "numpy", "scipy": "scipy", "tqdm": "tqdm",
                   "matplotlib": "matplotlib", "pydicom": "pydicom", "PIL": "pillow", "submitit": "submitit"}
    sources = [p for folder in ("dataloaders", "models", "util", "data_preprocessing") for p in
               (REPO / folder).rglob("*.py")] + [REPO / name for name in ("training.py", "validation.py",
                                                                            "config_ssl_upload.py")]
    imported = set()
    for path in sources:
        imported |= set(re.findall(r"^\s*(?:from|import) ([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), re.M))
    runtime = {_key(Requirement(r))[0] for r in _pyproject()["dependencies"]}
    for module, dist in provided_by.items():
        if module in imported:
            assert dist in runtime, f"{module} is imported but {dist} is not in pyproject's dependencies"
