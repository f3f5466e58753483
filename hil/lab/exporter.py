"""A controller's labgrid exporter configuration and its places, generated from the controller's rig files.

Each rig becomes one resource group (named after the rig) holding one ``CmHilRig`` resource. labgrid exports a
resource class it does not know as plain data (``labgrid.remote.exporter.add_resource`` falls back to
``ResourceEntry``), so the rig's console, power and boot-mode lines and USB port travel to the coordinator as
the resource's parameters without a fork of labgrid, and acquiring the place marks that resource acquired.

The console is deliberately *not* exported as a ``RawSerialPort``: labgrid would start ser2net on it when the
place is acquired, and this framework's own flows open the console themselves, exclusively, on the controller.
Nor are the relay lines exported as ``SysfsGPIO`` (labgrid speaks only the sysfs GPIO ABI, while the rigs use
gpiozero pin factories).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hil.errors import InputError
from hil.lab.coordinator import RIG_RESOURCE, STAGE
from hil.nightly import reports_root
from hil.rig import Rig

#: This checkout of cm-hil: where a controller's commands run.
WORKDIR = Path(__file__).resolve().parents[2]


def rig_params(rig: Rig, *, controller: str, site: str, host: str = "") -> dict[str, Any]:
    """What the lab needs to know of one rig, and where to run its flows (the controller and its rig file).
    Flat scalars only: that is what labgrid's resource parameters carry."""
    params: dict[str, Any] = {
        "rig": rig.name,
        "rig_file": str(rig.path.resolve()),
        "controller": controller,
        "host": host or socket.gethostname(),  # how the lab reaches this controller (ssh)
        "python": sys.executable,
        "workdir": str(WORKDIR),
        "reports": str(reports_root().resolve()),  # where its runs' reports and its image cache go
        "site": site,
        "model": rig.model.name,
        "usb_port": str(rig.usb_port),
        "usb_ports": ",".join(str(p) for p in rig.usb_ports),
        "console": str(rig.console.device),
        "console_baud": rig.console.baud,
        "power": rig.power.backend,
        "virtual": rig.is_virtual,
    }
    for line in rig.relays.lines():  # power, nrpi_boot, eeprom_nwp
        params[f"{line.role}_gpio"] = line.gpio
        params[f"{line.role}_active_high"] = line.active_high
        params[f"{line.role}_pin_factory"] = line.pin_factory
    return params


def place_tags(rig: Rig, *, controller: str, site: str) -> dict[str, str]:
    """The place's tags: model, rig, controller and site, then the rig file's own ``[lab.tags]``."""
    tags = {"model": rig.model.name, "rig": rig.name, "controller": controller}
    if site:
        tags["site"] = site
    return {**tags, **rig.lab.tags}


def place_match(rig: Rig, *, controller: str) -> str:
    return f"{controller}/{rig.name}/{RIG_RESOURCE}"


def exporter_config(rigs: Iterable[Rig], *, controller: str, site: str = "", host: str = "") -> dict[str, Any]:
    """The exporter's resource configuration (labgrid's YAML, as data)."""
    config: dict[str, Any] = {}
    for rig in rigs:
        if rig.name in config:
            raise InputError(f"two rig files are called {rig.name}. Fix: give each rig its own name (it names "
                             "its resource group and place)", stage=STAGE)
        rig_site = rig.lab.site or site
        config[rig.name] = {"location": f"{rig_site}/{controller}" if rig_site else controller,
                            RIG_RESOURCE: rig_params(rig, controller=controller, site=rig_site, host=host)}
    return config


def places(rigs: Iterable[Rig], *, controller: str, site: str = "") -> dict[str, Mapping[str, Any]]:
    """place name -> its tags, match and comment, for the coordinator."""
    out: dict[str, Mapping[str, Any]] = {}
    for rig in rigs:
        rig_site = rig.lab.site or site
        out[rig.lab.place or rig.name] = {
            "tags": place_tags(rig, controller=controller, site=rig_site),
            "match": place_match(rig, controller=controller),
            "comment": f"cm-hil rig {rig.name} ({rig.model.name}) on {controller}",
        }
    return out
