"""USB devices on a umockdev testbed, reached through the real libusb, pyusb and pyudev.

The testbed fakes sysfs, udev events and ``/dev/bus/usb``. This module owns the testbed, its host
controllers, hubs and ports; what one attached device answers on its usbfs node is
:mod:`hil.virtual.usb.enumeration`, its disks :mod:`hil.virtual.usb.disks`.

umockdev allows one testbed per process, so :class:`UsbBus` is a process-wide singleton (``UsbBus.get()``).
While it exists this process (and children that inherit its C environment) see the testbed's ``/sys``.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import platform
import re
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

from hil import usbport  # noqa: E402
from hil.errors import InfrastructureError, InputError  # noqa: E402
from hil.hostenv import umockdev_active  # noqa: E402
from hil.virtual.journal import Journal  # noqa: E402
from hil.virtual.usb import sysfs  # noqa: E402
from hil.virtual.usb.device import BlockChild, UsbDeviceModel  # noqa: E402
from hil.virtual.usb.disks import Disks  # noqa: E402
from hil.virtual.usb.doorbell import Doorbell  # noqa: E402
from hil.virtual.usb.enumeration import DRIVERS, Enumeration  # noqa: E402
from hil.virtual.usb.hostprofiles import HostProfile, controller_spec  # noqa: E402
from hil.virtual.usb.hubs import hub as _hub  # noqa: E402
from hil.virtual.usb.ueventqueue import uevent_queue_shortfall  # noqa: E402

log = logging.getLogger(__name__)
STAGE = "usb.transport"


@dataclass
class _Bus:
    """One USB bus: its host controller, root hub and the hubs created for port paths."""

    number: int
    controller: sysfs.HostController
    profile: HostProfile
    pci_syspath: str
    hubs: dict[str, Enumeration] = field(default_factory=dict)  # "usb1", "1-1", ...
    next_devnum: int = 1

    @property
    def pci_name(self) -> str:
        return self.pci_syspath.rsplit("/", 1)[1]


class UsbPort:
    """A downstream port such as ``1-1.4``; implements :class:`hil.virtual.usb.device.UsbBusPort`."""

    def __init__(self, bus: UsbBus, port: str, bus_number: int, hub: str, journal: Journal | None):
        self.port = port
        self.journal = journal
        self._bus = bus
        self._bus_number = bus_number
        self._hub = hub  # name of the hub this port belongs to
        self._current: Enumeration | None = None

    @property
    def attached(self) -> UsbDeviceModel | None:
        current = self._current
        return current.model if current else None

    @property
    def devname(self) -> str | None:
        """``/dev/bus/usb/BBB/DDD`` of the attached device (a new DDD at every attach)."""
        current = self._current
        return current.node.devname if current else None

    @property
    def disks(self) -> tuple[str, ...]:
        """``/dev/sdX`` of the attached device's disks, by LUN."""
        current = self._current
        return tuple(node.devname for _, node, _ in current.disks) if current else ()

    def attach(self, device: UsbDeviceModel) -> None:
        with self._bus._lock:
            self._bus._require_open()
            if self._current is not None:
                raise InfrastructureError(f"USB port {self.port} already has a device; detach it first",
                                          stage=STAGE)
            self._current = self._bus._plug(self._bus_number, self._hub, self.port, device, self.journal)
            self._current.record("attach", devname=self._current.node.devname,
                                 id=f"{device.identity.vid:04x}:{device.identity.pid:04x}")
            if device.identity.disks:
                self._bus.disks.set_disks(self._current, device.identity.disks)

    def detach(self) -> None:
        with self._bus._lock:
            current, self._current = self._current, None
            if current is not None:
                current.record("detach")
                self._bus._unplug(current)

    def update_disks(self, disks: tuple[BlockChild, ...]) -> None:
        with self._bus._lock:
            if self._current is None:
                raise InfrastructureError(f"USB port {self.port} has no device to give disks to", stage=STAGE)
            self._bus.disks.set_disks(self._current, disks)


class UsbBus:
    """The process's virtual USB: host controllers, hubs and ports on one umockdev testbed."""

    _instance: ClassVar[UsbBus | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()
    _closed: ClassVar[bool] = False

    @classmethod
    def get(cls) -> UsbBus:
        """The process-wide bus, created on first use and kept until the process ends.

        There is no second one: libusb watches the first testbed's uevents and keeps its device list from
        them, as does the process's uevent monitor (:mod:`hil.uevents`), so they would never see a new one."""
        with cls._instance_lock:
            if cls._instance is None:
                if cls._closed:
                    raise InfrastructureError(
                        "this process's virtual USB bus was closed, and libusb and the uevent monitor here stay "
                        "bound to it. Fix: use the virtual rig from a new process", stage=STAGE)
                cls._instance = cls()
                atexit.register(cls._instance.close)
            return cls._instance

    def __init__(self) -> None:
        if UsbBus._instance is not None:
            raise InfrastructureError("a UsbBus already exists in this process; use UsbBus.get()",
                                      stage=STAGE)
        if not umockdev_active():
            raise InfrastructureError(
                "the virtual USB bus needs umockdev's preload library; run the command under "
                "`umockdev-wrapper` (apt package umockdev)", stage=STAGE)
        shortfall = uevent_queue_shortfall()
        if shortfall:
            log.warning("%s", shortfall)
        self._lock = threading.RLock()
        self._testbed: Any = UMockdev.Testbed.new()
        self.root_dir: str = self._testbed.get_root_dir()
        self._buses: dict[int, _Bus] = {}
        self._ports: dict[str, UsbPort] = {}
        self._handlers: dict[str, Enumeration] = {}  # device node -> its enumeration, until retired
        self.disks = Disks(self._testbed, self.root_dir, self._remove_records)

    def child_env(self) -> dict[str, str]:
        """Environment for a child process that must see and drive the virtual devices (pyusb, pyudev,
        rpiboot): ``UMOCKDEV_DIR`` is set at C level only, so ``os.environ`` lacks it."""
        return {**os.environ, "UMOCKDEV_DIR": self.root_dir}

    def port(self, path: str, controller: str = "xhci", journal: Journal | None = None) -> UsbPort:
        """The port at ``path`` ("1-1.4": bus 1, root port 1, hub port 4), creating its bus, host
        controller and hubs on first use. ``controller`` is a kind with an optional host profile
        (``"ehci-hypothesis-maxpacket"``; :mod:`hil.virtual.usb.hostprofiles`), lenient unless said otherwise."""
        parsed = usbport.UsbPort(path)  # the one port-path parser (this module's UsbPort is a bus port)
        kind_name, profile = controller_spec(controller, tuple(sysfs.CONTROLLERS))
        number, chain = parsed.bus, list(parsed.ports)
        kind = sysfs.CONTROLLERS[kind_name]
        limits = [kind.root_ports] + [sysfs.HUB_PORTS] * (len(chain) - 1)
        if not 1 <= number <= 64 or any(not 1 <= p <= limit for p, limit in zip(chain, limits, strict=True)):
            raise InputError(f"USB port path {path!r} is out of range: bus 1-64, root ports "
                             f"1-{kind.root_ports}, hub ports 1-{sysfs.HUB_PORTS}", stage=STAGE)
        with self._lock:
            self._require_open()
            bus = self._bus(number, kind, profile)
            if bus.controller is not kind or bus.profile is not profile:
                raise InputError(f"USB bus {number} already hangs off an {bus.controller.kind}-{bus.profile.name} "
                                 f"controller, not {controller}; give port {path} another bus", stage=STAGE)
            if path not in self._ports:
                hub = f"usb{number}"
                for depth in range(1, len(chain)):
                    name = f"{number}-{'.'.join(map(str, chain[:depth]))}"
                    if name not in bus.hubs:
                        bus.hubs[name] = self._plug(number, hub, name, _hub(0x05E3, 0x0610, 0x0656,
                                                    {1: "GenesysLogic", 2: "USB2.1 Hub"}), None)
                    hub = name
                self._ports[path] = UsbPort(self, path, number, hub, journal)
            port = self._ports[path]
            if journal is not None:
                port.journal = journal
            return port

    def close(self) -> None:
        """Remove every device and the testbed with its temporary folder (at process exit)."""
        with self._lock:
            if self._testbed is None:
                return
            for port in self._ports.values():
                port.detach()
            for bus in self._buses.values():
                for hub in reversed(bus.hubs.values()):
                    self._unplug(hub)
                self._remove_records([sysfs.controller_record(bus.pci_syspath, bus.controller)])
            for node, enumeration in self._handlers.items():
                self._testbed.detach_ioctl(node)
                if enumeration.doorbell is not None:
                    enumeration.doorbell.close()
            self._handlers.clear()
            for name in self.disks.block_handlers:
                self._testbed.detach_ioctl(name)
            self.disks.forget_testbed()
            testbed, self._testbed = self._testbed, None
            del testbed
            gc.collect()
            shutil.rmtree(self.root_dir, ignore_errors=True)
        with UsbBus._instance_lock:
            if UsbBus._instance is self:
                UsbBus._instance = None
                UsbBus._closed = True

    # -- internals (bus lock held) -------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._testbed is None:
            raise InfrastructureError("the virtual USB bus is closed; call UsbBus.get() for a new one",
                                      stage=STAGE)

    def _bus(self, number: int, kind: sysfs.HostController, profile: HostProfile) -> _Bus:
        bus = self._buses.get(number)
        if bus is not None:
            return bus
        # a fixed address per bus number, whatever order buses appear in: eight buses per PCI slot
        pci = f"/sys/devices/pci0000:00/0000:00:{kind.pci_slot + (number - 1) // 8:02x}.{(number - 1) % 8}"
        for driver in (f"pci/drivers/{kind.driver}", "usb/drivers/usb", "usb/drivers/hub",
                       "usb/drivers/usb-storage", "scsi/drivers/sd"):
            os.makedirs(os.path.join(self.root_dir, "sys/bus", driver), exist_ok=True)
        self._testbed.add_from_string(sysfs.controller_record(pci, kind).text())
        bus = self._buses[number] = _Bus(number, kind, profile, pci)
        release = platform.release()
        version = re.match(r"(\d+)\.(\d+)", release)
        bcd = int(f"{version[1]}{int(version[2]):02d}", 16) if version else 0
        strings = {1: bus.pci_name, 2: kind.product + profile.label, 3: f"Linux {release} {kind.driver}"}
        root_hub = _hub(0x1D6B, 0x0002, bcd, strings)
        bus.hubs[f"usb{number}"] = self._plug(number, None, f"usb{number}", root_hub, None)
        return bus

    def _syspath_of(self, number: int, name: str) -> str:
        bus = self._buses[number]
        if name.startswith("usb"):
            return f"{bus.pci_syspath}/{name}"
        parent = name.rsplit(".", 1)[0] if "." in name else f"usb{number}"
        return f"{self._syspath_of(number, parent)}/{name}"

    def _devnum(self, bus: _Bus) -> int:
        """The next free device number, round robin from 1 to 127 as Linux allocates them."""
        for _ in range(127):
            devnum, bus.next_devnum = bus.next_devnum, bus.next_devnum % 127 + 1
            if f"/dev/bus/usb/{bus.number:03d}/{devnum:03d}" not in self._handlers:
                return devnum
        raise InfrastructureError(f"USB bus {bus.number} has no free device number", stage=STAGE)

    def _plug(self, number: int, hub: str | None, name: str, model: UsbDeviceModel,
              journal: Journal | None) -> Enumeration:
        self._retire_idle()
        bus = self._buses[number]
        devpath = "0" if hub is None else name.split("-", 1)[1]
        node = sysfs.UsbNode(self._syspath_of(number, name), name, number, self._devnum(bus), devpath,
                             bus.pci_name, sysfs.effective_speed(model.identity.speed, bus.controller))
        config = sysfs.parse_config(model.identity.config_descriptors[0])
        drivers = {i.number: DRIVERS[i.cls] for i in config.interfaces if i.cls in DRIVERS}
        admission = bus.profile.admit(node.speed, model.identity.config_descriptors, model.identity.device_descriptor)
        enumeration = Enumeration(node, model, bus.controller, drivers, journal, admission)
        for line in admission.warnings:  # what the kernel would print in dmesg
            log.warning("usb %s: %s", name, line)
            enumeration.record("kernel", message=line)
        if admission.refusal is not None:
            log.warning("usb %s: %s-%s controller: %s", name, bus.controller.kind, bus.profile.name,
                        admission.reason)
            enumeration.record("refused", controller=f"{bus.controller.kind}-{bus.profile.name}",
                               reason=admission.reason)
        handler = UMockdev.IoctlBase()
        handler.connect("handle-ioctl", enumeration.on_ioctl)
        handler.connect("client-vanished", enumeration.on_vanished)  # for a umockdev that emits it
        self._testbed.attach_ioctl(node.devname, handler)
        self._handlers[node.devname] = enumeration
        enumeration.doorbell = Doorbell(self.root_dir + node.devname)
        identity = model.identity
        is_hub = identity.device_descriptor[4] == 9
        maxchild = (bus.controller.root_ports if hub is None else sysfs.HUB_PORTS) if is_hub else 0
        enumeration.records = sysfs.device_records(node, identity.device_descriptor,
                                                   identity.config_descriptors, identity.strings, drivers, maxchild)
        # umockdev aborts the whole process when asked to add a device that exists: clear what an unplug
        # that failed half-way (in a device thread, where nobody saw the error) may have left behind.
        stale = [r for r in enumeration.records if os.path.exists(self.root_dir + r.syspath)]
        if stale:
            log.warning("usb %s: removing %d stale sysfs entries before enumerating", name, len(stale))
            self._remove_records(stale)
        self._testbed.add_from_string("\n".join(r.text() for r in enumeration.records))
        return enumeration

    def _unplug(self, enumeration: Enumeration) -> None:
        try:
            enumeration.unplug()
            for _, disk, records in reversed(enumeration.disks):
                self.disks.remove_disk(disk, records)
            enumeration.disks.clear()
        finally:  # the device must leave sysfs whatever else failed, or its port can never be used again
            self._remove_records(enumeration.records + enumeration.scsi_host)
            self._retire_idle()

    def _remove_records(self, records: list[sysfs.Record]) -> None:
        """Children first; umockdev 0.17.16's remove_device() sends no "remove" uevent itself."""
        for record in reversed(records):
            self._testbed.uevent(record.syspath, "remove")
            self._testbed.remove_device(record.syspath)

    def _retire_idle(self) -> None:
        """Drop ioctl handlers of unplugged devices that no host holds open any more."""
        for node, enumeration in list(self._handlers.items()):
            if enumeration.idle:
                self._testbed.detach_ioctl(node)
                del self._handlers[node]
                if enumeration.doorbell is not None:
                    enumeration.doorbell.close()

    # -- disks ---------------------------------------------------------------------------------------------
