"""Virtual CM4/CM5 rigs for the EEPROM tests: fast (speed-up 20), small eMMCs, short timeouts, on USB buses no
other test file uses (12 for the CM4, 13 for the CM5), so they share the test process's umockdev testbed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

PORTS = {"cm4": "12-1.4", "cm5": "13-1.5"}
#: Host seconds. At speed-up 20 the bootloader's banner arrives within a tenth of a second; the rest is slack
#: for a loaded machine. A torn EEPROM is proven by silence, which lasts the whole bootloader timeout.
TIMEOUTS = {"rom": 6, "second_stage": 4, "file_server": 20, "bootloader": 2.5, "kernel": 8, "login": 10,
            "command": 5}


def rig_text(name: str, model: str, state: Path, *, nwp_at_rest: bool = False) -> str:
    stage_timeouts = "".join(f"{k} = {v}\n" for k, v in TIMEOUTS.items())
    return f"""
name = "{name}"
model = "{model}"
[emmc]
size = "64MiB"
[relays]
off_time = 0.05
nwp_protect_at_rest = {str(nwp_at_rest).lower()}
[relays.power]
gpio = 17
[relays.nrpi_boot]
gpio = 27
[relays.eeprom_nwp]
gpio = 22
[usb]
port = "{PORTS[model]}"
[console]
[timeouts]
{stage_timeouts}
[virtual]
speedup = 20
state_dir = "{state}"
[virtual.emmc]
write_mbps = 0
read_mbps = 0
loop_device = false
"""


@pytest.fixture(scope="session")
def virtual_usb() -> None:
    """Skip unless the virtual rig's USB works here (root, under umockdev-wrapper). The umockdev bus is imported
    before any pytester, which would otherwise drop and re-import it (GLib types cannot be made twice)."""
    if os.geteuid() != 0 or "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("the virtual rig's USB needs root and umockdev: run pytest as root under umockdev-wrapper")
    import hil.virtual.usb.umockdev_bus  # noqa: F401


@pytest.fixture
def make_rig(tmp_path: Path) -> Callable[..., Path]:
    """make_rig(model, name=None, nwp_at_rest=False) -> the path of a new virtual rig file."""

    def make(model: str, name: str | None = None, nwp_at_rest: bool = False) -> Path:
        name = name or f"eeprom-{model}"
        path = tmp_path / f"{name}.toml"
        path.write_text(rig_text(name, model, tmp_path / "state" / name, nwp_at_rest=nwp_at_rest))
        return path

    return make
