"""Virtual rig files for the framework's own tests, rendered from data so that one place knows the file's shape.

The test files share one process: one umockdev testbed and one gpiozero mock pin factory. What keeps their rigs
apart is each file's own USB bus and GPIOs, so callers always name the port and keep their GPIOs distinct.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from hil.models import MODELS

#: An unlimited eMMC: tests wait for the module, not for a realistic write speed.
NO_SPEED_LIMIT = {"write_mbps": 0, "read_mbps": 0}


def virtual_rig_toml(name: str, model: str, port: str, *, state_dir: Path | None = None, emmc: str = "64MiB",
                     power_gpio: int = 17, boot_gpio: int | None = 27, nwp_gpio: int | None = 22,
                     off_time: float | None = 0.05, baud: int | None = None,
                     timeouts: Mapping[str, float] | None = None, speedup: float = 20,
                     emmc_speed: Mapping[str, float] | None = NO_SPEED_LIMIT, loop_device: bool | None = None,
                     extra: str | Mapping[str, Any] = "") -> str:
    """A virtual rig file. ``None`` leaves a setting to the rig loader's default (or the relay unwired); the EEPROM
    nWP relay is wired only on models that have a bootloader EEPROM. ``extra`` (TOML text or the same data as a
    mapping) is merged over the rest, table by table."""
    relays: dict[str, Any] = {} if off_time is None else {"off_time": off_time}
    relays["power"] = {"gpio": power_gpio}
    if boot_gpio is not None:
        relays["nrpi_boot"] = {"gpio": boot_gpio}
    if nwp_gpio is not None and MODELS[model].has_eeprom:
        relays["eeprom_nwp"] = {"gpio": nwp_gpio}
    virtual: dict[str, Any] = {"speedup": speedup}
    if state_dir is not None:
        virtual["state_dir"] = str(state_dir)
    virtual_emmc = {**(emmc_speed or {}), **({} if loop_device is None else {"loop_device": loop_device})}
    if virtual_emmc:
        virtual["emmc"] = virtual_emmc
    rig: dict[str, Any] = {"name": name, "model": model, "emmc": {"size": emmc}, "relays": relays,
                           "usb": {"port": port}, "console": {} if baud is None else {"baud": baud}}
    if timeouts:
        rig["timeouts"] = dict(timeouts)
    rig["virtual"] = virtual
    return tomli_w.dumps(merged(rig, tomllib.loads(extra) if isinstance(extra, str) else extra))


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top: tables merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = merged(out[key], value) if both_tables else value
    return out
