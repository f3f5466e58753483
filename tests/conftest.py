"""Isolation for the framework's own tests: each test session gets its own runtime and state folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_owned: Path | None = None
if "HIL_RUNTIME_DIR" not in os.environ:  # xdist workers inherit the controller's folders
    _owned = Path(tempfile.mkdtemp(prefix="cm-hil-tests-"))
    os.environ["HIL_RUNTIME_DIR"] = str(_owned / "run")
    os.environ.setdefault("HIL_STATE_DIR", str(_owned / "state"))
    os.environ.setdefault("HIL_CACHE_DIR", str(_owned / "cache"))
os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


def pytest_unconfigure(config: pytest.Config) -> None:
    if _owned is not None:
        shutil.rmtree(_owned, ignore_errors=True)
