"""The seam between a USB device *model* and the *transport* that puts it on a bus.

A model (boot ROM, second stage, mass storage) knows the protocol and nothing of how it is attached; a
transport (umockdev today, a Linux USB gadget in a QEMU guest later) knows how to appear on a bus and
carry transfers, and nothing of the protocol. Transports call models from their own worker threads, so
a model method may block (a device that is busy simply does not complete the request); the ``cancel``
event fires when the host gives up on the transfer (libusb timeout / URB discard) or the device loses
power, and a blocked method must then return promptly by raising :class:`Cancelled`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol


class UsbFault(Exception):
    """A transfer outcome other than success; transports map each to the matching usbfs status."""


class Stall(UsbFault):
    """The endpoint answers with a STALL handshake (usbfs -EPIPE, libusb PIPE)."""


class DeviceGone(UsbFault):
    """The device left the bus during the transfer (usbfs -ENODEV / -ESHUTDOWN, libusb NO_DEVICE)."""


class Cancelled(UsbFault):
    """The host discarded the transfer or power was cut; the transport completes it as cancelled."""


class Unresponsive(UsbFault):
    """The device never answers this transfer (no handshake); it ends only by the host's timeout."""


@dataclass(frozen=True)
class ControlSetup:
    """The 8-byte setup packet of a control transfer."""

    bmRequestType: int
    bRequest: int
    wValue: int
    wIndex: int
    wLength: int

    @property
    def is_in(self) -> bool:
        return bool(self.bmRequestType & 0x80)

    @property
    def is_vendor(self) -> bool:
        return (self.bmRequestType >> 5) & 3 == 2

    @property
    def is_standard(self) -> bool:
        return (self.bmRequestType >> 5) & 3 == 0


@dataclass(frozen=True)
class BlockChild:
    """A disk behind a mass-storage device: what the host's kernel would create as ``/dev/sdX``."""

    target: str  # the real block device (or file) that backs the disk, e.g. /dev/loop3
    size: int  # bytes the medium reports; 0 = no medium yet
    vendor: str  # SCSI INQUIRY vendor (8 chars), e.g. "RPi-MSD-"
    model: str  # SCSI INQUIRY product (16 chars)


@dataclass(frozen=True)
class UsbIdentity:
    """Everything a host learns by enumeration, plus what sysfs shows for the device."""

    device_descriptor: bytes  # 18 bytes
    config_descriptors: tuple[bytes, ...]  # full configuration descriptors as the kernel caches them
    strings: dict[int, str]  # string descriptor index -> text (index 0, the language list, is implied)
    speed: str  # "full" (12 Mb/s), "high" (480 Mb/s) or "super" (5000 Mb/s)
    disks: tuple[BlockChild, ...] = field(default=())  # block children (mass storage only)

    @property
    def vid(self) -> int:
        return int.from_bytes(self.device_descriptor[8:10], "little")

    @property
    def pid(self) -> int:
        return int.from_bytes(self.device_descriptor[10:12], "little")

    @property
    def iserial(self) -> int:
        return self.device_descriptor[16]


class UsbDeviceModel(Protocol):
    """One enumeration of a device: what is on the bus between an attach and the next detach."""

    identity: UsbIdentity

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        """Handle every control transfer on EP0, standard requests included.

        ``data`` is the OUT data stage (empty for IN). Return the IN data (at most ``wLength`` bytes; a
        shorter reply is a short packet), or ``b""`` for OUT. Raise a :class:`UsbFault` otherwise.
        """
        ...

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        """Receive one bulk OUT transfer; return how many bytes the device accepted."""
        ...

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        """Produce one bulk IN transfer of at most ``length`` bytes."""
        ...


class UsbBusPort(Protocol):
    """What a transport offers the models of one port: appear, disappear, be told of host actions."""

    port: str  # "1-1.4"

    def attach(self, device: UsbDeviceModel) -> None:
        """Enumerate ``device`` on this port (an "add" event; the host can open it from now on)."""
        ...

    def detach(self) -> None:
        """Remove whatever is on this port (a "remove" event); transfers in flight end as gone."""
        ...

    def update_disks(self, disks: tuple[BlockChild, ...]) -> None:
        """Change the attached device's block children (medium inserted, size known, late disk)."""
        ...
