"""Repository-wide pytest set-up (the doctests of ``nddrify/`` and ``recipes/`` and the tests).

Every test, doctests included, gets its own temporary folder for ``tempfile`` (the doctests'
``tempfile.mkdtemp()`` examples among them), removed when the test ends; with
``tmp_path_retention_policy = "failed"`` (pyproject.toml) the ``tmp_path`` folders of passing
tests go too, so a full run keeps its disk footprint small on a CI machine.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _private_tempfile_folder(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    folder = tmp_path_factory.mktemp("tempfile", numbered=True)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield
    shutil.rmtree(folder, ignore_errors=True)
