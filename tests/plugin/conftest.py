"""Rig files for the plugin's tests: small, fast virtual rigs (speed-up 20, 256 MiB eMMC, no speed limit) on
USB buses no other test file uses (9, 10, 11), so they can share the test process's umockdev testbed."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hil.models import MODELS
from tests.rigfiles import virtual_rig_toml

REPO = Path(__file__).resolve().parents[2]
#: Host seconds; at speed-up 20 a module boots to login in about a second, but other tests may load the machine.
TIMEOUTS = {"rom": 8, "second_stage": 3, "bootloader": 8, "kernel": 10, "login": 12, "command": 8, "mass_storage": 15}


@pytest.fixture(scope="session")
def wrapper() -> str:
    """umockdev-wrapper, which a separate ``hil`` process re-runs itself under."""
    found = shutil.which("umockdev-wrapper")
    if os.geteuid() != 0 or found is None:
        pytest.skip("the virtual rig needs root and umockdev-wrapper (run ./setup.sh)")
    return found


@pytest.fixture
def suites() -> list[str]:
    """This plugin's suites (other suites in the folder have their own tests)."""
    return [str(REPO / "suites" / "test_rig_selfcheck.py"), str(REPO / "suites" / "test_flash_and_boot.py")]


def write_rig(folder: Path, name: str, model: str = "cm4", port: str = "9-1.4", extra: str = "",
              timeouts: dict[str, float] | None = None) -> Path:
    """A new virtual rig file ``folder/NAME.toml``, its state kept under ``folder/state``."""
    path = folder / f"{name}.toml"
    # CM4/CM5 modules here were configured with BOOT_UART=1 (their factory config has 0), so the self-check's
    # bootloader banner and the boot's bootloader milestone are part of these runs
    configured = MODELS[model].has_eeprom and "[customise]" not in extra
    extra = ("[customise]\nbootloader_uart = true\n" if configured else "") + extra
    path.write_text(virtual_rig_toml(name, model, port, state_dir=folder / "state" / name, emmc="256MiB",
                                     timeouts={**TIMEOUTS, **(timeouts or {})}, extra=extra))
    return path


@pytest.fixture
def make_rig(tmp_path: Path) -> Callable[..., Path]:
    """make_rig(name, model="cm4", port="9-1.4", extra="", timeouts=None) -> the path of a new virtual rig file."""
    return functools.partial(write_rig, tmp_path)


@pytest.fixture(scope="module")
def make_module_rig(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_rig for a module's fixtures: the rig files live as long as the module's tests."""
    return functools.partial(write_rig, tmp_path_factory.mktemp("rigs"))
