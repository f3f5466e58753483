"""USB descriptors of every boot stage, and the standard requests all stage models answer alike.

Facts from usbboot-protocol.md sections 1 and 1.1 (VID/PID, iSerialNumber index, interface layouts) and
section 6 (the BCM2835 ROM's full-speed descriptor with bulk wMaxPacketSize 512 and EP2 declared OUT).
The descriptors are built as bytes because that is what both the kernel cache (sysfs ``descriptors``)
and GET_DESCRIPTOR replies carry.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from hil.models import BROADCOM_VID, GADGET_PID, MSD_PID, ModuleModel
from hil.virtual.usb.device import BlockChild, ControlSetup, Stall, UsbIdentity

DEVICE, CONFIGURATION, STRING, INTERFACE, ENDPOINT, IAD = 1, 2, 3, 4, 5, 11
BULK, INTERRUPT = 2, 3
LANGID_EN_US = 0x0409

GET_STATUS, CLEAR_FEATURE, SET_FEATURE, SET_ADDRESS = 0, 1, 3, 5
GET_DESCRIPTOR, GET_CONFIGURATION, SET_CONFIGURATION, GET_INTERFACE, SET_INTERFACE = 6, 8, 9, 10, 11


@dataclass(frozen=True)
class Endpoint:
    address: int  # bit 7 set = IN
    attributes: int = BULK
    max_packet: int = 512
    interval: int = 0

    def pack(self) -> bytes:
        return struct.pack("<BBBBHB", 7, ENDPOINT, self.address, self.attributes, self.max_packet,
                           self.interval)

    @property
    def is_out(self) -> bool:
        return not self.address & 0x80


@dataclass(frozen=True)
class Interface:
    number: int
    cls: int
    subclass: int
    protocol: int
    endpoints: tuple[Endpoint, ...]
    extra: bytes = b""  # class-specific descriptors between the interface and its endpoints
    association: int = 0  # > 0: an interface association descriptor for this many interfaces precedes it

    def pack(self) -> bytes:
        head = b""
        if self.association:
            head = struct.pack("<8B", 8, IAD, self.number, self.association, self.cls, self.subclass,
                               self.protocol, 0)
        body = struct.pack("<9B", 9, INTERFACE, self.number, 0, len(self.endpoints), self.cls, self.subclass,
                           self.protocol, 0)
        return head + body + self.extra + b"".join(e.pack() for e in self.endpoints)


def device_descriptor(pid: int, iserial: int, *, vid: int = BROADCOM_VID, bcd_device: int = 0,
                      imanufacturer: int = 1, iproduct: int = 2) -> bytes:
    """18 bytes: USB 2.0, class per interface, EP0 64 bytes, one configuration."""
    return struct.pack("<BBHBBBBHHHBBBB", 18, DEVICE, 0x0200, 0, 0, 0, 64, vid, pid, bcd_device,
                       imanufacturer, iproduct, iserial, 1)


def config_descriptor(interfaces: tuple[Interface, ...], *, attributes: int = 0xC0, max_power_ma: int = 100,
                      iconfiguration: int = 0) -> bytes:
    body = b"".join(i.pack() for i in interfaces)
    return struct.pack("<BBHBBBBB", 9, CONFIGURATION, 9 + len(body), len(interfaces), 1, iconfiguration,
                       attributes, max_power_ma // 2) + body


def string_descriptor(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    return bytes((2 + len(raw), STRING)) + raw


def endpoint_descriptors(config: bytes) -> list[bytes]:
    """The 7-byte endpoint descriptors of a configuration descriptor, in order."""
    found, i = [], 0
    while i + 2 <= len(config) and config[i] >= 2:
        if config[i + 1] == ENDPOINT:
            found.append(bytes(config[i:i + 7]))
        i += config[i]
    return found


def out_endpoints(config: bytes) -> frozenset[int]:
    """Addresses of the bulk OUT endpoints a configuration descriptor declares."""
    return frozenset(d[2] for d in endpoint_descriptors(config) if not d[2] & 0x80)


@dataclass(frozen=True)
class Descriptors:
    """One stage's descriptor set. ``first_config`` is what the first GET_DESCRIPTOR(config) returns when
    it differs from the patched copy the firmware serves afterwards (the 55/32 quirk)."""

    device: bytes
    config: bytes
    strings: dict[int, str]
    speed: str
    first_config: bytes | None = None

    def identity(self, disks: tuple[BlockChild, ...] = ()) -> UsbIdentity:
        return UsbIdentity(self.device, (self.config,), dict(self.strings), self.speed, disks)

    @property
    def bulk_out(self) -> frozenset[int]:
        """Every OUT endpoint the host may have learnt, from either form of the configuration."""
        return out_endpoints(self.config) | out_endpoints(self.first_config or b"")


def _vendor_interface(number: int, out_ep: int, in_ep: int, max_packet: int = 512) -> Interface:
    return Interface(number, 0xFF, 0, 0, (Endpoint(out_ep, max_packet=max_packet),
                                          Endpoint(in_ep, max_packet=max_packet)))


def _mass_storage_interface(number: int, out_ep: int, in_ep: int, max_packet: int = 512) -> Interface:
    return Interface(number, 0x08, 0x06, 0x50,
                     (Endpoint(out_ep, max_packet=max_packet), Endpoint(in_ep, max_packet=max_packet)))


def _two_interface_config() -> bytes:
    """The 55-byte static copy in msd/bootcode.bin: mass storage on if 0, the vendor interface on if 1."""
    return config_descriptor((_mass_storage_interface(0, 0x01, 0x82), _vendor_interface(1, 0x03, 0x84, 64)))


def rom_descriptors(model: ModuleModel, serial: str, *, config_55_32: bool, full_speed: bool) -> Descriptors:
    """The boot ROM. At full speed it declares EP2 without the IN bit; a BCM2835 ROM, at full speed by design,
    declares legal 64-byte bulk packets (no "invalid maxpacket" in usbboot #69's log), the later ROMs fallen back
    to full speed keep their 512 bytes (Linux clamps them, usbboot #226)."""
    packet = 64 if full_speed and model.rom_full_speed else 512
    second = Endpoint(0x02, max_packet=packet) if full_speed else Endpoint(0x82)
    config = config_descriptor((Interface(0, 0xFF, 0, 0, (Endpoint(0x01, max_packet=packet), second)),))
    strings = {1: "Broadcom", 2: model.rom_product}
    if model.rom_iserial:
        strings[model.rom_iserial] = serial
    return Descriptors(device_descriptor(model.rom_pid, model.rom_iserial), config, strings,
                       "full" if full_speed else "high", _two_interface_config() if config_55_32 else None)


def stage2_descriptors(model: ModuleModel, serial: str, *, config_55_32: bool) -> Descriptors:
    """The second stage: 2835/2837 ``bootcode.bin`` (iSerial 1 = "Broadcom") or bootcode4/5 (iSerial 4)."""
    config = config_descriptor((_vendor_interface(0, 0x01, 0x82),))
    strings = {1: "Broadcom", 2: model.stage2_product}
    if model.stage2_iserial != 1:
        strings[model.stage2_iserial] = serial
    first = _two_interface_config() if config_55_32 and model.stage2_iserial == 1 else None
    device = device_descriptor(model.stage2_pid, model.stage2_iserial)
    return Descriptors(device, config, strings, "high", first)


def msd_descriptors() -> Descriptors:
    """Legacy ``msd/start.elf`` firmware: one bulk-only mass-storage interface, 0a5c:0001.
    Its product string is not documented; the Windows hardware id "Rpi-MSD-0001" stands in."""
    config = config_descriptor((_mass_storage_interface(0, 0x01, 0x82),))
    return Descriptors(device_descriptor(MSD_PID, 0), config, {1: "Broadcom", 2: "Rpi-MSD-0001"}, "high")


def _acm_interfaces(first: int, notify_ep: int, out_ep: int, in_ep: int) -> tuple[Interface, Interface]:
    functional = (bytes((5, 0x24, 0x00, 0x10, 0x01))  # header, CDC 1.10
                  + bytes((5, 0x24, 0x01, 0x00, first + 1))  # call management
                  + bytes((4, 0x24, 0x02, 0x02))  # ACM capabilities: line coding
                  + bytes((5, 0x24, 0x06, first, first + 1)))  # union
    notify = Endpoint(notify_ep, INTERRUPT, 10, 9)
    comm = Interface(first, 0x02, 0x02, 0x01, (notify,), functional, association=2)
    data = Interface(first + 1, 0x0A, 0x00, 0x00, (Endpoint(out_ep), Endpoint(in_ep)))
    return comm, data


def gadget_descriptors(serial: str) -> Descriptors:
    """mass-storage-gadget64's configfs gadget: a mass_storage function (the eMMC) and a CDC-ACM console."""
    interfaces = (_mass_storage_interface(0, 0x01, 0x81), *_acm_interfaces(1, 0x83, 0x02, 0x82))
    config = config_descriptor(interfaces, attributes=0x80, max_power_ma=250, iconfiguration=4)
    strings = {1: "Raspberry Pi", 2: "Raspberry Pi multi-function USB device", 3: serial,
               4: "Config 1: ECM network"}
    return Descriptors(device_descriptor(GADGET_PID, 3, bcd_device=0x0100), config, strings, "high")


@dataclass
class StandardRequests:
    """Chapter 9 requests on EP0, shared by every stage model. Returns None for non-standard requests."""

    descriptors: Descriptors
    configuration: int = 1  # the kernel configured the device during enumeration
    _config_reads: int = 0
    _alt: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, setup: ControlSetup, data: bytes) -> bytes | None:
        if not setup.is_standard:
            return None
        request, value = setup.bRequest, setup.wValue
        if request == GET_DESCRIPTOR and setup.is_in:
            return self._descriptor(value >> 8, value & 0xFF)[: setup.wLength]
        if request == GET_STATUS and setup.is_in:
            self_powered = setup.bmRequestType & 0x1F == 0 and self.descriptors.config[7] & 0x40
            return bytes((1 if self_powered else 0, 0))[: setup.wLength]
        if request == GET_CONFIGURATION:
            return bytes((self.configuration,))[: setup.wLength]
        if request == SET_CONFIGURATION and value in (0, 1):
            self.configuration = value
            return b""
        if request == GET_INTERFACE:
            return bytes((self._alt.get(setup.wIndex, 0),))[: setup.wLength]
        if request == SET_INTERFACE and value == 0:
            self._alt[setup.wIndex] = value
            return b""
        if request in (CLEAR_FEATURE, SET_FEATURE, SET_ADDRESS):
            return b""
        raise Stall(f"standard request {request} wValue {value:#x}")

    def _descriptor(self, kind: int, index: int) -> bytes:
        d = self.descriptors
        if kind == DEVICE:
            return d.device
        if kind == CONFIGURATION and index == 0:
            with self._lock:
                self._config_reads += 1
                first = self._config_reads == 1
            return d.first_config if first and d.first_config else d.config
        if kind == STRING:
            if index == 0:
                return struct.pack("<BBH", 4, STRING, LANGID_EN_US)
            if index in d.strings:
                return string_descriptor(d.strings[index])
        raise Stall(f"no descriptor type {kind} index {index}")
