"""Rig files for the plugin's tests: small, fast virtual rigs (speed-up 20, 256 MiB eMMC, no speed limit) on
USB buses no other test file uses (9, 10, 11), so they can share the test process's umockdev testbed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Host seconds; at speed-up 20 a module boots to login in about a second, but other tests may load the machine.
TIMEOUTS = {"rom": 8, "second_stage": 3, "bootloader": 8, "kernel": 10, "login": 12, "command": 8, "mass_storage": 15}

@pytest.fixture(scope="session")
def virtual_usb() -> None:
    """Skip unless the virtual rig's USB and eMMC work here: root, under umockdev-wrapper."""
    if os.geteuid() != 0 or "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("the virtual rig's USB and eMMC need root and umockdev: run pytest as root under umockdev-wrapper")
    # Each pytester drops the modules imported while it exists, but GLib types and the process's one umockdev
    # testbed cannot be made twice: the virtual USB bus is imported here, once, before any pytester.
    import hil.virtual.usb.umockdev_bus  # noqa: F401


@pytest.fixture
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


def rig_text(name: str, model: str, port: str, state: Path, *, extra: str = "",
             timeouts: dict[str, float] | None = None) -> str:
    nwp = "[relays.eeprom_nwp]\ngpio = 22\n" if model in ("cm4", "cm5") else ""
    stage_timeouts = "".join(f"{k} = {v}\n" for k, v in {**TIMEOUTS, **(timeouts or {})}.items())
    return f"""
name = "{name}"
model = "{model}"
[emmc]
size = "256MiB"
[relays]
off_time = 0.05
[relays.power]
gpio = 17
[relays.nrpi_boot]
gpio = 27
{nwp}
[usb]
port = "{port}"
[console]
[timeouts]
{stage_timeouts}
[virtual]
speedup = 20
state_dir = "{state}"
[virtual.emmc]
write_mbps = 0
read_mbps = 0
{extra}
"""


@pytest.fixture
def make_rig(tmp_path: Path) -> Callable[..., Path]:
    """make_rig(name, model="cm4", port="9-1.4", extra="", timeouts=None) -> the path of a new virtual rig file."""

    def make(name: str, model: str = "cm4", port: str = "9-1.4", extra: str = "",
             timeouts: dict[str, float] | None = None) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(rig_text(name, model, port, tmp_path / "state" / name, extra=extra, timeouts=timeouts))
        return path

    return make
