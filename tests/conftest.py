"""Isolation for the framework's own tests: each test session gets its own runtime and state folders. Also the one
skip (and import) for tests that need the virtual rig's USB."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hil.hostenv import umockdev_active

_owned: Path | None = None
if "HIL_RUNTIME_DIR" not in os.environ:  # xdist workers inherit the controller's folders
    _owned = Path(tempfile.mkdtemp(prefix="cm-hil-tests-"))
    os.environ["HIL_RUNTIME_DIR"] = str(_owned / "run")
    os.environ.setdefault("HIL_STATE_DIR", str(_owned / "state"))
    os.environ.setdefault("HIL_CACHE_DIR", str(_owned / "cache"))
    os.environ.setdefault("HIL_REPORTS_DIR", str(_owned / "reports"))  # nightly history, matrix.db
os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def virtual_usb() -> None:
    """Skip unless the virtual rig's USB and eMMC work here: root, under umockdev-wrapper."""
    if os.geteuid() != 0 or not umockdev_active():
        pytest.skip("the virtual rig's USB and eMMC need root and umockdev: run pytest as root under umockdev-wrapper")
    # Each pytester drops the modules imported while it exists, but GLib types and the process's one umockdev
    # testbed cannot be made twice: the virtual USB bus is imported here, once, before any pytester.
    import hil.virtual.usb.umockdev_bus  # noqa: F401


def pytest_unconfigure(config: pytest.Config) -> None:
    if _owned is not None:
        shutil.rmtree(_owned, ignore_errors=True)
