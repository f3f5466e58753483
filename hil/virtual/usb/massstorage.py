"""The mass-storage identities the module ends as: legacy msd firmware (0a5c:0001) or the Linux
mass-storage-gadget64 (0a5c:0104). The disk itself is a block child the transport shows as ``/dev/sdX``;
on a real host the kernel's usb-storage driver owns the bulk endpoints, so a program that tries them
here gets a STALL.
"""

from __future__ import annotations

import threading

from hil.virtual.usb.descriptors import Descriptors, StandardRequests, gadget_descriptors, msd_descriptors
from hil.virtual.usb.device import BlockChild, ControlSetup, Stall
from hil.virtual.usb.switches import DeviceEnv

GET_MAX_LUN, BULK_ONLY_RESET = 0xFE, 0xFF


def msd_disk(target: str, size: int) -> BlockChild:
    """SCSI INQUIRY of the legacy msd firmware: "RPi-MSD-" / "0001"."""
    return BlockChild(target=target, size=size, vendor="RPi-MSD-", model="0001")


def gadget_disk(target: str, size: int, device: str = "mmcblk0") -> BlockChild:
    """The gadget sets ``inquiry_string`` to the device name, which lands in the vendor field (``mmcblk0`` for
    the eMMC, ``nvme0n1`` for an NVMe drive on the carrier)."""
    return BlockChild(target=target, size=size, vendor=device, model="")


class MassStorage:
    """A bulk-only mass-storage device whose disk(s) the host kernel would own."""

    def __init__(self, env: DeviceEnv, descriptors: Descriptors, disks: tuple[BlockChild, ...]):
        self.env = env
        self.descriptors = descriptors
        self.identity = descriptors.identity(disks)
        self._std = StandardRequests(descriptors)

    @classmethod
    def msd(cls, env: DeviceEnv, disk: BlockChild) -> MassStorage:
        return cls(env, msd_descriptors(), (disk,))

    @classmethod
    def gadget(cls, env: DeviceEnv, disk: BlockChild, *more: BlockChild) -> MassStorage:
        return cls(env, gadget_descriptors(f"10000000{env.serial}"), (disk, *more))

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        self.env.check_power()
        reply = self._std.handle(setup, data)
        if reply is not None:
            return reply
        class_request = (setup.bmRequestType >> 5) & 3 == 1
        if class_request and setup.bRequest == GET_MAX_LUN and setup.is_in:
            return bytes((len(self.identity.disks) - 1,))[: setup.wLength]
        if class_request and setup.bRequest == BULK_ONLY_RESET:
            return b""
        raise Stall(f"request {setup.bmRequestType:#x}/{setup.bRequest} is not supported")

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        raise Stall("the host kernel's usb-storage driver owns this endpoint")

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        raise Stall("the host kernel's usb-storage driver owns this endpoint")
