"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability_fixtures import build_phantom


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny processed phantom (6 scans of 64x64x12, class map, superpixels), built once per session.

    Tests must not modify it: copy it first (``tests.reliability_fixtures.copy_data``).
    """
    return build_phantom(tmp_path_factory.mktemp("tiny_phantom"))
