"""Find the module's disk: the block device whose USB ancestor sits on the rig's port.

The port path (``1-1.4``) is the one identity that survives re-enumeration; ``sdX`` names do not, and a
second module or a USB stick on another port must never be mistaken for ours. Waiting is driven by
block uevents (with a slow re-scan as a safety net), first for the disk, then for its medium to have a
size (mass-storage devices may report "no medium" for a while).
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyudev

from hil import uevents
from hil.errors import InfrastructureError, ProductError
from hil.usbport import UsbPort

STAGE = "disk.discovery"


@dataclass(frozen=True)
class Disk:
    node: str  # /dev/sdX
    syspath: str
    port: UsbPort  # USB port path of the disk's USB device, e.g. 1-1.4
    size: int  # bytes; 0 = no medium
    vendor: str
    model: str
    bus: str  # ID_BUS: "usb" for a USB mass-storage disk
    id_path: str | None  # udev's ID_PATH
    serial: str | None
    usb_id: str = ""  # idVendor:idProduct of the USB device the disk hangs off, e.g. "0a5c:0104"
    others: tuple[str, ...] = ()  # the other disks of the same USB device, named and left alone

    @property
    def by_path(self) -> str | None:
        """``/dev/disk/by-path/...`` when udev made that link."""
        if not self.id_path:
            return None
        link = f"/dev/disk/by-path/{self.id_path}"
        return link if os.path.lexists(link) else None

    def describe(self) -> str:
        ident = " ".join(x for x in (self.vendor, self.model) if x) or "unknown"
        usb = f" {self.usb_id}" if self.usb_id else ""
        beside = f"; left alone beside it: {', '.join(self.others)}" if self.others else ""
        return f"{self.node} ({ident}, {self.size} bytes, USB{usb} port {self.port}{beside})"


def usb_port(device: pyudev.Device) -> UsbPort | None:
    """The port path of the USB device a block device hangs off, or None if it is not behind USB."""
    usb = device.find_parent("usb", "usb_device")
    return UsbPort(usb.sys_name) if usb is not None and UsbPort.valid(usb.sys_name) else None


def _disk(device: pyudev.Device) -> Disk | None:
    usb = device.find_parent("usb", "usb_device")
    node = device.device_node
    if usb is None or node is None:
        return None
    port = usb.sys_name
    ids = tuple((usb.attributes.get(key) or b"").decode(errors="replace").strip() for key in ("idVendor", "idProduct"))
    props = device.properties
    scsi = device.find_parent("scsi", "scsi_device")

    def text(key: str, attr: str) -> str:
        value = props.get(key)
        if value is None and scsi is not None:
            raw = scsi.attributes.get(attr)
            value = raw.decode(errors="replace") if raw else ""
        return (value or "").strip()

    try:
        size = device.attributes.asint("size") * 512
    except (KeyError, ValueError):
        size = 0
    return Disk(node=node, syspath=device.sys_path, port=port, size=size, vendor=text("ID_VENDOR", "vendor"),
                model=text("ID_MODEL", "model"), bus=props.get("ID_BUS", "usb"), id_path=props.get("ID_PATH"),
                serial=props.get("ID_SERIAL"), usb_id=":".join(ids) if all(ids) else "")


#: What mass-storage-gadget64 writes as each disk's SCSI vendor (its inquiry string is the device name).
TARGETS = {"emmc": "mmcblk", "nvme": "nvme"}


def choose(disks: list[Disk], target: str = "emmc") -> Disk | None:
    """Of the disks one module exports (eMMC and NVMe on a carrier with an M.2 slot), the ``target`` one by its
    identity, with the others named in ``others``; None when the identities do not tell."""
    if len(disks) == 1 and target == "emmc":
        return disks[0]
    prefix = TARGETS[target]
    found = [d for d in disks if d.vendor.lower().startswith(prefix)]
    if len(found) != 1 or len({d.usb_id for d in disks}) != 1:
        return None
    return replace(found[0], others=tuple(f"{d.node} ({d.vendor or 'unknown'}, {d.size} bytes)"
                                          for d in disks if d is not found[0]))


def disks_on_port(port: UsbPort, context: pyudev.Context | None = None) -> list[Disk]:
    """Whole disks behind the USB device on ``port``, as things are now."""
    context = context or pyudev.Context()
    found = []
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        disk = _disk(device)
        if disk is not None and disk.port == port:
            found.append(disk)
    return found


def wait_for_disk(port: UsbPort, timeout: float, *, target: str = "emmc", context: pyudev.Context | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Disk:
    """The ``target`` disk ("emmc" or "nvme") on ``port`` once its medium has a size. Disks on other ports are
    ignored; a second disk of the same module (a carrier's NVMe) is named and left alone."""
    context = context or pyudev.Context()
    events: queue.SimpleQueue[None] = queue.SimpleQueue()
    deadline = clock() + timeout
    seen: list[Disk] = []

    def on_uevent(device: pyudev.Device) -> None:
        if device.subsystem == "block":
            events.put(None)

    with uevents.hub().listening(on_uevent):
        while True:
            seen = disks_on_port(port, context)
            chosen = choose(seen, target) if seen else None
            if chosen is not None and chosen.size > 0:
                return chosen
            if len(seen) > 1 and chosen is None:
                break  # several disks and none is the one: no need to wait
            remaining = deadline - clock()
            if remaining <= 0:
                break
            with contextlib.suppress(queue.Empty):
                events.get(timeout=min(remaining, uevents.RESCAN))
                while True:  # drain a burst, then look again
                    events.get_nowait()
    if seen and choose(seen, target) is None:  # (a module's disks appear one by one: judged at the end)
        raise InfrastructureError(
            f"USB port {port} has {len(seen)} disk(s) ({', '.join(d.describe() for d in seen)}) and none is the "
            f"module's {target} by its identity. Fix: check the rig's port (is a hub or card reader on it?) and "
            "[usb] disk in the rig file", stage=STAGE, disks=[d.node for d in seen])
    if seen:
        raise ProductError(f"the disk {seen[0].node} on USB port {port} still has no medium (size 0) after "
                           f"{timeout:g} s: the module's eMMC did not come up", stage=STAGE, disk=seen[0].node)
    raise InfrastructureError(f"no disk appeared on USB port {port} within {timeout:g} s. Fix: check that the "
                              "module reached mass-storage mode and the rig's usb port is right", stage=STAGE)
