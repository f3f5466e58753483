"""The Linux usbfs ABI that libusb speaks on ``/dev/bus/usb/BBB/DDD`` (LP64, little endian: x86_64/aarch64).

Only what the umockdev transport answers: ioctl numbers, the ``struct usbdevfs_urb`` layout and the
capability bits, spelled as in ``include/uapi/linux/usbdevice_fs.h``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("U") << 8) | nr


SETINTERFACE = _ioc(_READ, 4, 8)
SETCONFIGURATION = _ioc(_READ, 5, 4)
GETDRIVER = _ioc(_WRITE, 8, 260)
SUBMITURB = _ioc(_READ, 10, 56)
DISCARDURB = _ioc(_NONE, 11, 0)
REAPURB = _ioc(_WRITE, 12, 8)
REAPURBNDELAY = _ioc(_WRITE, 13, 8)
CLAIMINTERFACE = _ioc(_READ, 15, 4)
RELEASEINTERFACE = _ioc(_READ, 16, 4)
CONNECTINFO = _ioc(_WRITE, 17, 8)
IOCTL = _ioc(_READ | _WRITE, 18, 16)
RESET = _ioc(_NONE, 20, 0)
CLEAR_HALT = _ioc(_READ, 21, 4)
DISCONNECT = _ioc(_NONE, 22, 0)  # only as the ioctl_code inside USBDEVFS_IOCTL
CONNECT = _ioc(_NONE, 23, 0)  # idem
GET_CAPABILITIES = _ioc(_READ, 26, 4)
DISCONNECT_CLAIM = _ioc(_READ, 27, 264)
GET_SPEED = _ioc(_NONE, 31, 0)

# request number -> name, for logs
NAMES = {v: k for k, v in dict(globals()).items()
         if isinstance(v, int) and k.isupper() and (v >> 8) & 0xFF == ord("U")}

# capability bits (USBDEVFS_CAP_*)
CAP_ZERO_PACKET = 0x01
CAP_BULK_CONTINUATION = 0x02
CAP_NO_PACKET_SIZE_LIM = 0x04
CAP_BULK_SCATTER_GATHER = 0x08
CAP_REAP_AFTER_DISCONNECT = 0x10

# URB types and flags
URB_TYPE_ISO, URB_TYPE_INTERRUPT, URB_TYPE_CONTROL, URB_TYPE_BULK = 0, 1, 2, 3
URB_SHORT_NOT_OK = 0x01

# USB_SPEED_* as USBDEVFS_GET_SPEED returns them
SPEED_CODES = {"low": 1, "full": 2, "high": 3, "super": 5}

_URB = struct.Struct("<BBxxiIxxxxQiiiiiIQ")
URB_SIZE = _URB.size  # 56
URB_STATUS_OFFSET = 4
URB_BUFFER_OFFSET = 16
URB_ACTUAL_LENGTH_OFFSET = 28
SETUP_SIZE = 8  # a control URB's buffer starts with the setup packet


@dataclass(frozen=True)
class Urb:
    """The fields of a submitted ``struct usbdevfs_urb`` that the transport needs."""

    type: int
    endpoint: int
    flags: int
    buffer_length: int

    @classmethod
    def parse(cls, raw: bytes) -> Urb:
        fields = _URB.unpack(raw[:URB_SIZE])
        return cls(type=fields[0], endpoint=fields[1], flags=fields[3], buffer_length=fields[5])

    @property
    def is_in(self) -> bool:
        return bool(self.endpoint & 0x80)


def u32(raw: bytes, offset: int = 0) -> int:
    return int.from_bytes(raw[offset : offset + 4], "little")


def i32_bytes(value: int) -> bytes:
    return value.to_bytes(4, "little", signed=True)
