"""A virtual rig brought to life from a rig file: eMMC, console, relay board, module and its USB side.

The framework then drives it exactly as hardware: gpiozero pins on the process-wide mock factory, the
console's pty at ``rig.console.device``, USB devices under ``rig.usb_port`` through umockdev (when the
process runs under ``umockdev-wrapper``), and the mass-storage disk backed by the eMMC's block device.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import TYPE_CHECKING

from hil.errors import InputError
from hil.rig import Rig
from hil.virtual.console import VirtualConsole
from hil.virtual.emmc import VirtualEmmc
from hil.virtual.journal import Journal
from hil.virtual.module import VirtualModule
from hil.virtual.relays import mock_factory
from hil.virtual.timing import DeviceClock

if TYPE_CHECKING:
    from hil.virtual.usb.side import VirtualUsb


def umockdev_active() -> bool:
    """True when libusb and udev calls of this process reach umockdev (not the host's real devices)."""
    return "libumockdev-preload" in os.environ.get("LD_PRELOAD", "")


class VirtualRig:
    def __init__(self, rig: Rig, *, usb: bool | None = None):
        if rig.virtual is None:
            raise InputError(f"{rig.path} describes real hardware (it has no [virtual] section); "
                             "use one of rigs/virtual-*.toml", stage="virtual")
        self.rig = rig
        self.want_usb = umockdev_active() if usb is None else usb
        self.journal = Journal()
        self.clock = DeviceClock(rig.virtual.speedup)
        self.emmc = VirtualEmmc(rig.virtual.state_dir / "emmc.img", rig.emmc_size, rig.virtual.emmc, self.journal)
        self.console = VirtualConsole.for_rig(rig, self.clock, self.journal)
        self.module = VirtualModule(rig, self.emmc, self.console, self.clock, self.journal)
        self._opened: list[object] = []

    def open(self) -> VirtualRig:
        try:
            self.emmc.open()
            self._opened.append(self.emmc)
            self.console.open()
            self._opened.append(self.console)
            if self.want_usb:
                self.module.usb = self._usb_side()
            self.module.connect_relays(mock_factory())
            self._opened.append(self.module)
        except BaseException:
            self.close()
            raise
        return self

    def _usb_side(self) -> VirtualUsb:
        from hil.virtual.usb.side import VirtualUsb
        from hil.virtual.usb.switches import parse_switches
        from hil.virtual.usb.umockdev_bus import UsbBus

        assert self.rig.virtual is not None
        switches = parse_switches(self.rig.virtual.usb, self.rig.model, self.rig.path)
        bus = UsbBus.get()
        return VirtualUsb(self.rig.model, bus.port(self.rig.usb_port), self.emmc.block_device, self.rig.emmc_size,
                          switches, self.clock, self.journal, extra_port_factory=bus.port)

    def close(self) -> None:
        """Power down and take everything away, in reverse order of creation."""
        while self._opened:
            part = self._opened.pop()
            part.close()  # type: ignore[attr-defined]

    def __enter__(self) -> VirtualRig:
        return self.open()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
