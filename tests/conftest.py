"""Isolation for the framework's own tests: each test session gets its own runtime and state folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_session_dir = Path(tempfile.mkdtemp(prefix="cm-hil-tests-"))
os.environ.setdefault("HIL_RUNTIME_DIR", str(_session_dir / "run"))
os.environ.setdefault("HIL_STATE_DIR", str(_session_dir / "state"))
os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the xdist controller (or a plain run) owns the folder
        shutil.rmtree(_session_dir, ignore_errors=True)
