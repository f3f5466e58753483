"""Quirk and fault switches of the virtual module's USB side (the rig file's ``[virtual.usb]`` table).

Quirks are what real devices do and default to the real behaviour per model; faults default off and are
turned on by a rig file to rehearse a failure the host must survive (usbboot-protocol.md section 10.2).
:class:`DeviceEnv` bundles the switches with what every device model needs at run time.
"""

from __future__ import annotations

import difflib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from hil.errors import RigFileError
from hil.models import ModuleModel
from hil.units import parse_size
from hil.usbport import UsbPort
from hil.virtual.journal import Journal
from hil.virtual.timing import DeviceClock
from hil.virtual.usb.descriptors import Descriptors, StandardRequests
from hil.virtual.usb.device import ControlSetup, DeviceGone, Stall, Unresponsive

_PORT_HELP = 'a USB port path such as "1-1.5"'
_FLAGS = ("config_55_32", "full_speed", "rom_double_sighting", "no_detach_after_done", "no_mass_storage",
          "automount")


@dataclass(frozen=True)
class UsbSwitches:
    config_55_32: bool  # first GET_DESCRIPTOR(config) claims 55 bytes / 2 interfaces, later reads 32 / 1
    full_speed: bool  # ROM enumerates at full speed, EP2 declared OUT (2835: legal 64-byte bulk; later ROMs: 512)
    rom_double_sighting: bool = False  # ROM lingers ~1.5 s after its status; a re-send times out
    first_control: str | None = None  # "stall" | "timeout": first vendor control transfer per boot stage
    request_delay: float = 0.0  # extra device-side seconds before the first file request
    no_detach_after_done: bool = False  # second stage stays on the bus after Done; nothing follows
    rom_status: int = 0  # non-zero: the ROM answers every exchange with this status and does not boot
    rom_odd_status: int = 0  # non-zero: the ROM answers this status but boots anyway (rpiboot ignores it)
    rom_failed_exchanges: int = 0  # the first N boot-message announces per power-on are never answered (#87)
    truncated_bulk: int | None = None  # bulk OUT bytes accepted per power-on before the device NAKs forever
    disconnect_at: int | None = None  # bytes into the second-stage download where the device drops off
    no_mass_storage: bool = False  # after Done the device leaves and no mass storage appears
    late_disk: float = 0.0  # seconds the mass-storage device has no medium (size 0) before the eMMC shows
    duplicate_disk: str | None = None  # port path where a second disk over the same eMMC appears
    nvme: int = 0  # bytes of an NVMe drive on the carrier, which mass-storage-gadget64 exports too (0: none)
    automount: bool = False  # a desktop on the host automounts the disk's partitions (hil.virtual.desktop)


def default_switches(model: ModuleModel) -> UsbSwitches:
    """Real behaviour: 55/32 is logged for 2837 and 2711 ROMs (#357, cmprovision#67, fw#1184); no log shows
    it for 2835 or 2712. Full speed is what every 0a5c:2763 dmesg shows."""
    return UsbSwitches(config_55_32=model.chip in ("bcm2837", "bcm2711"), full_speed=model.rom_full_speed)


def parse_switches(raw: Mapping[str, Any], model: ModuleModel, source: object = "rig file") -> UsbSwitches:
    """Validate ``[virtual.usb]``. Raises :class:`RigFileError` (stage "rig-file") naming key and fix."""
    defaults = default_switches(model)
    values: dict[str, Any] = {}

    def fail(key: str, problem: str, fix: str) -> RigFileError:
        return RigFileError(source, f"virtual.usb.{key}", problem, fix)

    def number(key: str, value: Any, kind: type, minimum: float) -> Any:
        wrong_type = not isinstance(value, int | float) or kind is int and isinstance(value, float)
        if isinstance(value, bool) or wrong_type:
            raise fail(key, f"must be a {'whole number' if kind is int else 'number'}, not {value!r}",
                       f"write {key} = {int(minimum) if kind is int else float(minimum)} or more")
        if not math.isfinite(value):
            raise fail(key, f"must be a finite number, not {value}", f"use {minimum} or more")
        if value < minimum:
            raise fail(key, f"must be at least {minimum} ({value})", f"use {minimum} or more")
        return kind(value)

    for key, value in raw.items():
        if key in _FLAGS:
            if not isinstance(value, bool):
                raise fail(key, f"must be true or false, not {value!r}", f"write {key} = true")
            values[key] = value
        elif key == "first_control":
            if value not in ("stall", "timeout"):
                raise fail(key, f"{value!r} is not a known behaviour",
                           'use first_control = "stall" or "timeout"')
            values[key] = value
        elif key in ("request_delay", "late_disk"):
            values[key] = number(key, value, float, 0.0)
        elif key in ("truncated_bulk", "disconnect_at", "rom_failed_exchanges"):
            values[key] = number(key, value, int, 0)
        elif key in ("rom_status", "rom_odd_status"):
            values[key] = number(key, value, int, 1)
            if values[key] > 0xFFFFFFFF:
                raise fail(key, f"{value} does not fit the ROM's 32-bit status", "use a value below 2**32")
        elif key == "nvme":
            try:
                values[key] = parse_size(value) if isinstance(value, str | int) and not isinstance(value, bool) else -1
            except ValueError:
                values[key] = -1
            if values[key] < 1024 * 1024 or values[key] % 512:
                raise fail(key, f"{value!r} is not a drive size", 'write nvme = "1GiB" (a whole number of sectors)')
        elif key == "duplicate_disk":
            if not UsbPort.valid(value):
                raise fail(key, f"{value!r} is not a USB port path", f"write {key} = {_PORT_HELP}")
            values[key] = UsbPort(value)
        else:
            known = sorted(UsbSwitches.__dataclass_fields__)
            near = difflib.get_close_matches(str(key), known, n=1)
            raise fail(str(key), "is not a known switch",
                       f"did you mean {near[0]!r}?" if near else f"use one of {', '.join(known)}")
    return UsbSwitches(**{**defaults.__dict__, **values})


@dataclass
class DeviceEnv:
    """What every model of one power-on shares: switches, their one-shot state, time, record, power."""

    model: ModuleModel
    switches: UsbSwitches
    clock: DeviceClock
    journal: Journal
    serial: str  # SoC serial, 8 hex digits
    power_cut: threading.Event = field(default_factory=threading.Event)
    bulk_received: int = 0  # for truncated_bulk
    disconnect_fired: bool = False
    exchanges_failed: int = 0  # for rom_failed_exchanges
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take_bulk(self, n: int) -> bool:
        """Count ``n`` bulk bytes; False when ``truncated_bulk`` says the device accepts no more."""
        limit = self.switches.truncated_bulk
        with self._lock:
            if limit is not None and self.bulk_received + n > limit:
                return False
            self.bulk_received += n
            return True

    def fail_exchange(self) -> bool:
        """The ``rom_failed_exchanges`` fault: True (and counted) while this power-on has exchanges to fail."""
        with self._lock:
            if self.exchanges_failed >= self.switches.rom_failed_exchanges:
                return False
            self.exchanges_failed += 1
        self.journal.record("fault", "rom_failed_exchanges", stage="rom", failed=self.exchanges_failed)
        return True

    def check_power(self) -> None:
        if self.power_cut.is_set():
            raise DeviceGone("the module lost power")

    def fail_first_control(self, stage: str) -> NoReturn:
        """The ``first_control`` fault: this stage's first vendor request stalls or is never answered."""
        mode = self.switches.first_control
        self.journal.record("fault", "first_control", stage=stage, mode=mode)
        raise Stall("first control transfer") if mode == "stall" else Unresponsive("first control transfer")


class VendorControl:
    """EP0 as both boot stages answer it: standard requests from the descriptors, a stall for anything but
    vendor request 0, and the ``first_control`` fault on the stage's first vendor request."""

    def __init__(self, descriptors: Descriptors, env: DeviceEnv, stage: str):
        self._standard = StandardRequests(descriptors)
        self._env = env
        self._stage = stage
        self._armed = env.switches.first_control is not None

    def screen(self, setup: ControlSetup, data: bytes) -> bytes | None:
        """The reply to a standard request, or None for the vendor request the stage itself must handle."""
        reply = self._standard.handle(setup, data)
        if reply is not None:
            return reply
        if not setup.is_vendor or setup.bRequest != 0:
            raise Stall(f"unknown request {setup.bmRequestType:#x}/{setup.bRequest}")
        if self._armed:
            self._armed = False
            self._env.fail_first_control(self._stage)
        return None
