"""A virtual rig brought to life from a rig file: eMMC, console, relay board, module and its USB side.

The framework then drives it exactly as hardware: gpiozero pins on the process-wide mock factory, the
console's pty at ``rig.console.device``, USB devices under ``rig.usb_port`` through umockdev (when the
process runs under ``umockdev-wrapper``), and the mass-storage disk backed by the eMMC's block device.

A rig may list several USB ports, each on a host controller of its own (``[virtual.usb.controllers]``). The
module is cabled to one of them at a time, the first at start; :meth:`VirtualRig.cable` moves the cable, as
a person (or a USB switch) does between runs of a compatibility matrix.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

from hil.errors import InfrastructureError, InputError, RigFileError
from hil.hostenv import umockdev_active
from hil.rig import Rig
from hil.usbport import UsbPort
from hil.virtual.console import ConsoleFaults, VirtualConsole
from hil.virtual.eeprom import VirtualEeprom
from hil.virtual.emmc import VirtualEmmc
from hil.virtual.journal import Journal
from hil.virtual.module import State, VirtualModule
from hil.virtual.relays import mock_factory
from hil.virtual.supply import supply_for
from hil.virtual.timing import DeviceClock
from hil.virtual.usb import sysfs
from hil.virtual.usb.hostprofiles import DEFAULT_KIND, controller_spec
from hil.virtual.usb.kernel_bus import kernel_transport

if TYPE_CHECKING:
    from hil.virtual.desktop import Desktop
    from hil.virtual.usb.kernel_bus import KernelBus
    from hil.virtual.usb.side import VirtualUsb
    from hil.virtual.usb.umockdev_bus import UsbBus

CABLE_WAIT = 2.0  # host seconds a module switched off may take to discharge before its cable moves


def validate(rig: Rig) -> None:
    """Every ``[virtual.*]`` table the module reads only when it starts, checked now (``hil rig check``):
    RigFileError naming the key, with a "did you mean"."""
    from hil.virtual.usb.switches import parse_switches

    assert rig.virtual is not None
    _controllers(rig)
    switches = parse_switches(rig.virtual.usb, rig.model, rig.path)
    if switches.duplicate_disk in rig.usb_ports:
        raise RigFileError(rig.path, "virtual.usb.duplicate_disk", f"{switches.duplicate_disk} is the rig's own port",
                           "name another port for the twin disk, e.g. one the rig does not list")
    if rig.virtual.transport == "kernel":
        for port in rig.usb_ports:
            if UsbPort(port).ports != (1,):
                raise RigFileError(rig.path, "usb.port", f"{port} is behind a hub; the kernel transport's dummy_hcd "
                                   "buses have one root port each", 'use port = "1-1"')
        if rig.virtual.controllers:  # host profiles are the umockdev bus's; here the host is the guest's kernel
            raise RigFileError(rig.path, "virtual.usb.controllers", "the kernel transport's host controller is "
                               "dummy_hcd, driven by Linux itself", 'remove it, or use transport = "umockdev"')
    ConsoleFaults.from_rig(rig)


def _controllers(rig: Rig) -> None:
    assert rig.virtual is not None
    for port, text in rig.virtual.controllers.items():
        try:
            controller_spec(text, tuple(sysfs.CONTROLLERS))
        except InputError as e:
            raise RigFileError(rig.path, f"virtual.usb.controllers.{port}", e.message.rstrip("."),
                               'write "KIND-PROFILE", e.g. "xhci-lenient" or "ehci-hypothesis-maxpacket"') from None


def usb_bus() -> UsbBus | KernelBus:
    """The bus the virtual module's USB side plugs into: the guest's dummy_hcd buses on the kernel transport,
    else umockdev's testbed."""
    if kernel_transport():
        from hil.virtual.usb.kernel_bus import KernelBus

        return KernelBus.get()
    from hil.virtual.usb.umockdev_bus import UsbBus

    return UsbBus.get()


class VirtualRig:
    _running: ClassVar[dict[str, VirtualRig]] = {}
    _running_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, rig: Rig, *, usb: bool | None = None):
        if rig.virtual is None:
            raise InputError(f"{rig.path} describes real hardware (it has no [virtual] section); "
                             "use one of rigs/virtual-*.toml", stage="virtual")
        validate(rig)
        self.rig = rig
        self.port = rig.usb_port  # where the module's USB cable is plugged in
        self.want_usb = (umockdev_active() or kernel_transport()) if usb is None else usb
        self.journal = Journal()
        self.clock = DeviceClock(rig.virtual.speedup)
        self.emmc = VirtualEmmc(rig.virtual.state_dir / "emmc.img", rig.emmc_size, rig.virtual.emmc, self.journal)
        self.console = VirtualConsole.for_rig(rig, self.clock, self.journal)
        self.eeprom = VirtualEeprom(rig.model, rig.virtual.state_dir / "eeprom.bin", self.journal,
                                    lambda: self.module.eeprom_write_protected,
                                    boot_uart=rig.customise.bootloader_uart) if rig.model.has_eeprom else None
        self.module = VirtualModule(rig, self.emmc, self.console, self.clock, self.journal, self.eeprom)
        self._opened: list[object] = []
        self.desktop: Desktop | None = None  # a desktop session automounting the module's disk ([virtual.usb])

    def open(self) -> VirtualRig:
        try:
            assert self.rig.virtual is not None
            automount = self.want_usb and bool(self.rig.virtual.usb.get("automount"))
            self.emmc.open()
            self._opened.append(self.emmc)
            if automount:
                from hil.virtual.desktop import Desktop

                self.desktop = Desktop(self.port, self.emmc.block_device, self.rig.virtual.state_dir / "desktop",
                                       self.journal, Path("/run/media/root") / f"cm-hil-{self.rig.name}").open()
                self._opened.append(self.desktop)
            self.console.open()
            self._opened.append(self.console)
            if self.want_usb:
                self.module.usb = self._usb_side()
            self.module.connect_relays(mock_factory())
            self._opened.append(self.module)
            supply = supply_for(self.rig, lambda on: self.module.supply(on, self.rig.power.backend))
            if supply is not None:  # powered through a (virtual) hub port or commands, not a relay
                self._opened.append(supply.open())
            with VirtualRig._running_lock:
                VirtualRig._running[self.rig.name] = self
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def running(cls, name: str) -> VirtualRig:
        """The open virtual rig called ``name`` in this process (a test reaches the one its fixtures opened)."""
        with cls._running_lock:
            found = cls._running.get(name)
        if found is None:
            raise InfrastructureError(f"no virtual rig {name!r} is open in this process; open it first "
                                      "(VirtualRig(rig).open(), or the plugin's station fixture)", stage="virtual")
        return found

    def controller(self, port: str) -> str:
        """The host controller and profile of ``port`` as the rig file gives it (default: lenient xHCI)."""
        assert self.rig.virtual is not None
        return self.rig.virtual.controllers.get(UsbPort(port), DEFAULT_KIND)

    def cable(self, port: str) -> None:
        """Move the module's USB cable to ``port`` (one of the rig's ports) while the module is off."""
        port = UsbPort(port)
        if port not in self.rig.usb_ports:
            raise InputError(f"rig {self.rig.name} has no USB port {port}; its ports are "
                             f"{', '.join(self.rig.usb_ports)} ([usb] ports in {self.rig.path})", stage="virtual")
        usb = self.module.usb
        if usb is not None and port != self.port:
            from hil.virtual.usb.side import VirtualUsb

            assert isinstance(usb, VirtualUsb)
            if not self.module.wait_state(State.OFF, CABLE_WAIT):  # a module just switched off may still discharge
                raise InfrastructureError(f"the virtual {self.rig.model.name} is {self.module.state}; power it off "
                                          f"before moving its USB cable to {port}", stage="virtual")
            usb.port = usb_bus().port(port, self.controller(port), self.journal)
        self.port = port
        self.journal.record("usb", "cable", port=port, controller=self.controller(port))

    def _usb_side(self) -> VirtualUsb:
        from hil.virtual.usb.side import VirtualUsb
        from hil.virtual.usb.switches import parse_switches

        assert self.rig.virtual is not None
        switches = parse_switches(self.rig.virtual.usb, self.rig.model, self.rig.path)
        bus = usb_bus()
        for port in self.rig.usb_ports:  # every port's bus and controller exists, cabled or not, as on a host
            bus.port(port, self.controller(port), self.journal)
        nvme = None
        if switches.nvme:
            from hil.virtual.nvme import VirtualNvme

            nvme = VirtualNvme(self.rig.virtual.state_dir / "nvme.img", switches.nvme).open()
            self._opened.append(nvme)
        return VirtualUsb(self.rig.model, bus.port(self.port, self.controller(self.port), self.journal),
                          self.emmc.block_device, self.rig.emmc_size, switches, self.clock, self.journal,
                          extra_port_factory=bus.port, eeprom=self.eeprom,
                          nvme_block_device=nvme.block_device if nvme else None)

    def close(self) -> None:
        """Power down and take everything away, in reverse order of creation."""
        with VirtualRig._running_lock:
            if VirtualRig._running.get(self.rig.name) is self:
                del VirtualRig._running[self.rig.name]
        while self._opened:
            part = self._opened.pop()
            part.close()  # type: ignore[attr-defined]

    def __enter__(self) -> VirtualRig:
        return self.open()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
