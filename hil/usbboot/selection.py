"""Which USB device is ours, and what it is right now.

The module's identity is the port it is cabled to: the device number changes at every re-enumeration, and
two rigs on one host carry identical ROMs, so "the first 0a5c device on the bus" is never good enough.
The stage comes from the device descriptor's iSerialNumber *index* (usbboot-protocol.md section 1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import usb.core

from hil.models import BROADCOM_VID, GADGET_PID, MODELS, MSD_PID, ROM_PIDS, ModuleModel
from hil.usbport import UsbPort

ROM_ISERIALS = (0, 3)


def port_not_on_host(port: UsbPort) -> str | None:
    """Why this host has no such port (its bus or the hub it hangs off is not there, or that hub has fewer
    ports), or None when the port exists and was merely empty. Read from sysfs, as libusb sees it."""
    devices = Path("/sys/bus/usb/devices")
    parent = str(port.hub) if port.hub else f"usb{port.bus}"
    if not (devices / f"usb{port.bus}").exists():
        return f"this host has no USB bus {port.bus}, so port {port} does not exist here"
    if not (devices / parent).exists():
        return f"this host has no hub at {parent}, so port {port} does not exist here"
    try:
        ports = int((devices / parent / "maxchild").read_text())
    except (OSError, ValueError):
        return None
    if port.ports[-1] > ports:
        return f"the hub at {parent} has {ports} ports, so port {port} does not exist here"
    return None


class Stage(enum.Enum):
    ROM = "rom"
    SECOND_STAGE = "second_stage"
    MASS_STORAGE = "mass_storage"
    OTHER = "other"


@dataclass(frozen=True)
class Identity:
    """What enumeration told us about the device on the port."""

    vid: int
    pid: int
    iserial: int  # descriptor index, not the string
    bus: int
    address: int  # changes at every enumeration: tells a stale device from a new one

    @property
    def stage(self) -> Stage:
        if self.vid != BROADCOM_VID:
            return Stage.OTHER
        if self.pid in (MSD_PID, GADGET_PID):
            return Stage.MASS_STORAGE
        if self.pid in ROM_PIDS:
            return Stage.ROM if self.iserial in ROM_ISERIALS else Stage.SECOND_STAGE
        return Stage.OTHER

    def to_dict(self) -> dict[str, Any]:
        return {"vid": f"{self.vid:04x}", "pid": f"{self.pid:04x}", "iserial": self.iserial,
                "bus": self.bus, "address": self.address, "stage": self.stage.value}

    def __str__(self) -> str:
        return (f"{self.vid:04x}:{self.pid:04x} iSerial {self.iserial} "
                f"(address {self.address}, {self.stage.value})")


def identity(dev: usb.core.Device) -> Identity:
    return Identity(dev.idVendor, dev.idProduct, dev.iSerialNumber, dev.bus, dev.address)


def find_on_port(port: UsbPort, backend: Any) -> list[usb.core.Device]:
    """The Broadcom devices libusb lists on exactly this port (briefly two while one leaves).

    Other ports' devices are never opened: only their cached descriptors are compared."""
    found = usb.core.find(find_all=True, backend=backend, idVendor=BROADCOM_VID, bus=port.bus,
                          custom_match=lambda d: tuple(d.port_numbers or ()) == port.ports)
    return list(found)


def model_for_rom(pid: int) -> ModuleModel:
    """The chip family a ROM PID belongs to (0x2764 covers CM3 and CM3+, which boot alike)."""
    for model in MODELS.values():
        if model.rom_pid == pid:
            return model
    raise KeyError(pid)


@dataclass(frozen=True)
class Endpoints:
    interface: int
    out_ep: int


def endpoints(dev: usb.core.Device) -> Endpoints:
    """rpiboot's choice from the active configuration: 1 interface -> if0/EP1, 2 -> if1/EP3 (section 1.1)."""
    config = dev.get_active_configuration()
    return Endpoints(1, 0x03) if config.bNumInterfaces == 2 else Endpoints(0, 0x01)
