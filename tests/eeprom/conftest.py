"""Virtual CM4/CM5 rigs for the EEPROM tests: fast (speed-up 20), small eMMCs, short timeouts, on USB buses no
other test file uses (12 for the CM4, 13 for the CM5), so they share the test process's umockdev testbed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.rigfiles import virtual_rig_toml

PORTS = {"cm4": "12-1.4", "cm5": "13-1.5"}
#: Host seconds. At speed-up 20 the bootloader's banner arrives within a tenth of a second; the rest is slack
#: for a loaded machine. A torn EEPROM is proven by silence, which lasts the whole bootloader timeout.
TIMEOUTS = {"rom": 6, "second_stage": 4, "file_server": 20, "bootloader": 2.5, "kernel": 8, "login": 10,
            "command": 5}


@pytest.fixture
def make_rig(tmp_path: Path) -> Callable[..., Path]:
    """make_rig(model, name=None, nwp_at_rest=False) -> the path of a new virtual rig file."""

    def make(model: str, name: str | None = None, nwp_at_rest: bool = False) -> Path:
        name = name or f"eeprom-{model}"
        path = tmp_path / f"{name}.toml"
        path.write_text(virtual_rig_toml(name, model, PORTS[model], state_dir=tmp_path / "state" / name,
                                         timeouts=TIMEOUTS, loop_device=False,
                                         extra={"relays": {"nwp_protect_at_rest": nwp_at_rest}}))
        return path

    return make
