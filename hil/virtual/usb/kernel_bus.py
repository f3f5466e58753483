"""The kernel USB transport: the virtual module's ports on dummy_hcd buses inside the guest
(:mod:`hil.virtual.guest`), so the host side is Linux's own usbcore, usbfs, usb-storage and usbmon.

A ROM or second stage is served by :mod:`hil.virtual.usb.rawgadget` from the same models as on the umockdev
transport; a mass-storage stage, whose disk the host kernel owns anyway, is the kernel's configfs
f_mass_storage function with the model's identity (VID/PID, strings, SCSI INQUIRY) and its disks as LUNs
backed by the virtual eMMC's block device, so the disk the framework writes is usb-storage's ``/dev/sdX``.

dummy_hcd has no hubs: each bus ``N`` (``dummy_udc.<N-1>``) has one root port, ``N-1``; a rig's ports are
``B-1`` on this transport.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import ClassVar

from hil.errors import InfrastructureError, InputError
from hil.usbport import UsbPort
from hil.virtual.journal import Journal
from hil.virtual.usb.device import BlockChild, UsbDeviceModel, UsbIdentity
from hil.virtual.usb.rawgadget import RawGadgetDevice, dummy_udc, enable_wakeups

STAGE = "usb.transport"
CONFIGFS = Path("/sys/kernel/config/usb_gadget")
TRANSPORT_ENV = "HIL_USB_TRANSPORT"


def kernel_transport() -> bool:
    """True in the guest that runs a program on the kernel transport (``hil virtual run --transport kernel``)."""
    return os.environ.get(TRANSPORT_ENV) == "kernel"


def root_port(port: str) -> int:
    """The dummy_hcd bus of ``port``; a port behind a hub cannot exist on this transport."""
    parsed = UsbPort(port)
    if parsed.ports != (1,):
        raise InputError(f"USB port {port} is behind a hub, and the kernel transport's dummy_hcd buses have one "
                         "root port each and no hubs. Fix: give the rig port \"1-1\"",
                         stage=STAGE)
    return parsed.bus


def gadget_identity(g: Path, ident: UsbIdentity) -> None:
    """A configfs gadget folder with the device's IDs, strings and one configuration (``c.1``)."""
    desc = ident.device_descriptor
    g.mkdir()
    for attr, offset in (("bcdUSB", 2), ("idVendor", 8), ("idProduct", 10), ("bcdDevice", 12)):
        put(g / attr, f"0x{int.from_bytes(desc[offset:offset + 2], 'little'):04x}")
    for attr, offset in (("bDeviceClass", 4), ("bDeviceSubClass", 5), ("bDeviceProtocol", 6)):
        put(g / attr, f"0x{desc[offset]:02x}")
    strings = g / "strings" / "0x409"
    strings.mkdir(parents=True)
    for attr, index in (("manufacturer", desc[14]), ("product", desc[15]), ("serialnumber", desc[16])):
        if index and index in ident.strings:
            put(strings / attr, ident.strings[index])
    config = g / "configs" / "c.1"
    config.mkdir(parents=True)
    head = ident.config_descriptors[0]
    put(config / "MaxPower", str(head[8] * 2))
    put(config / "bmAttributes", f"0x{head[7]:02x}")


def remove_gadget(g: Path) -> None:
    """Take a gadget folder apart in the order configfs wants: links, functions, strings, configs."""
    if not g.exists():
        return
    config = g / "configs" / "c.1"
    for link in config.iterdir() if config.exists() else ():
        if link.is_symlink():
            link.unlink()
    for function in sorted((g / "functions").iterdir()):
        for lun in sorted(function.glob("lun.*"), reverse=True):
            if lun.name != "lun.0":
                lun.rmdir()
        function.rmdir()
    for folder in (g / "strings" / "0x409", config):
        if folder.exists():
            folder.rmdir()
    g.rmdir()


class MassStorageGadget:
    """A configfs gadget with one f_mass_storage function: the device's identity, one LUN per disk."""

    def __init__(self, name: str, udc: str, device: UsbDeviceModel):
        self.path = CONFIGFS / name
        self.udc = udc
        self.identity = device.identity

    def start(self) -> None:
        g = self.path
        gadget_identity(g, self.identity)
        function = g / "functions" / "mass_storage.0"
        function.mkdir(parents=True)
        put(function / "stall", "1")
        self.update(self.identity.disks)
        (g / "configs" / "c.1" / "mass_storage.0").symlink_to(function)
        put(g / "UDC", self.udc)

    def update(self, disks: tuple[BlockChild, ...]) -> None:
        function = self.path / "functions" / "mass_storage.0"
        for i, disk in enumerate(disks):
            lun = function / f"lun.{i}"
            if not lun.exists():  # lun.0 comes with the function
                lun.mkdir()
            put(lun / "removable", "1")
            put(lun / "inquiry_string", f"{disk.vendor:<8.8}{disk.model:<16.16}0001")
            put(lun / "file", disk.target if disk.size else "")

    def stop(self) -> None:
        if self.path.exists():
            put(self.path / "UDC", "")
        remove_gadget(self.path)


def put(path: Path, value: str) -> None:
    try:
        path.write_text(value + "\n")
    except OSError as e:
        raise InfrastructureError(f"configfs refused {value!r} for {path}: {e.strerror}", stage=STAGE) from None


class KernelPort:
    """One root port of a dummy_hcd bus (``hil.virtual.usb.device.UsbBusPort``)."""

    def __init__(self, port: str, journal: Journal):
        self.port = port
        self.bus = root_port(port)
        self.udc = dummy_udc(self.bus)
        self.journal = journal
        self._lock = threading.Lock()
        self._device: RawGadgetDevice | MassStorageGadget | None = None

    def attach(self, device: UsbDeviceModel) -> None:
        with self._lock:
            self._detach()
            gadget: RawGadgetDevice | MassStorageGadget
            if device.identity.disks:
                gadget = MassStorageGadget(f"hil-{self.bus}", self.udc, device)
            else:
                gadget = RawGadgetDevice(device, self.bus)
            try:
                gadget.start()
            except OSError as e:
                raise InfrastructureError(f"the kernel refused the virtual device on {self.port}: {e}",
                                          stage=STAGE) from None
            self._device = gadget
            ident = device.identity
            self.journal.record("usb", "attach", port=self.port, transport="kernel",
                                id=f"{ident.vid:04x}:{ident.pid:04x}", speed=ident.speed)

    def detach(self) -> None:
        with self._lock:
            self._detach()

    def _detach(self) -> None:
        if self._device is not None:
            self._device.stop()
            self._device = None
            self.journal.record("usb", "detach", port=self.port, transport="kernel")

    def update_disks(self, disks: tuple[BlockChild, ...]) -> None:
        with self._lock:
            if isinstance(self._device, MassStorageGadget):
                self._device.update(disks)


class KernelBus:
    """The guest's dummy_hcd buses as one bus with ports (``port()`` as on :class:`UsbBus`)."""

    _instance: ClassVar[KernelBus | None] = None

    def __init__(self) -> None:
        enable_wakeups()  # now, on the thread that opens the rig: later attaches run on the module's own thread
        self._ports: dict[str, KernelPort] = {}

    @classmethod
    def get(cls) -> KernelBus:
        if cls._instance is None:
            cls._instance = KernelBus()
        return cls._instance

    def port(self, port: str, controller: str = "", journal: Journal | None = None) -> KernelPort:
        """``controller`` (a umockdev host profile) has no meaning here: the guest's host is dummy_hcd."""
        key = str(UsbPort(port))
        if key not in self._ports:
            self._ports[key] = KernelPort(key, journal or Journal())
        return self._ports[key]
