"""How a host controller and its driver treat a device whose descriptors are not legal at its speed.

The model, and the evidence for it (usbboot-protocol.md section 6; nothing names the exact field of the
BCM2835 "slightly incorrect USB packet", so this is the best-supported reading, not a confirmed one):

* Every dmesg of the BCM2835 ROM (0a5c:2763) shows it enumerating at **full speed**, also on EHCI/xHCI
  ports, while its bulk endpoints keep the high-speed **wMaxPacketSize 512** (full-speed bulk allows at
  most 64; its siblings' ROMs do the same when they fall back to full speed, #226, fw#1184).
* **Lenient** hosts (Linux, Windows): the kernel clamps the value and goes on, logging
  ``endpoint 0x1 has invalid maxpacket 512, setting to 64`` (the warning users quote, #200, #226).
* **Strict** hosts: the oldest CM guide says macOS "drops the packet"; #35 and etcher#2197 report CM1 /
  Pi Zero not usable on Macs, and the guide says some ports fail, by controller and driver rather than
  USB 2 or 3. A stack that refuses rather than clamps leaves the device listed but unusable: the first
  transfer fails with a transaction error, which libusb reports as IO (-1; ``Failed control transfer
  (-1,24)`` on the ROM's first announce, #73) and Windows as PIPE (-9).
* Not modelled as a refusal: the 55/32 config-descriptor inconsistency (eeprom#255). The BCM2837 ROM has
  it too, and the guide says BCM2837 fixed the problem, so it cannot be what breaks the strict hosts.

A profile judges a device when the transport enumerates it (:func:`HostProfile.admit`); the transport
logs the kernel's warnings and, when refused, fails every transfer with the refusal's errno.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from hil.errors import InputError

CONFIGURATION, INTERFACE, ENDPOINT = 2, 4, 5
#: Largest wMaxPacketSize (bits 0-10) per transfer type (control, isochronous, bulk, interrupt), USB 2.0 5.5-5.8.
FULL_SPEED_MAX = (64, 1023, 64, 64)
LOW_SPEED_MAX = (8, 0, 0, 8)
DEFAULT_KIND = "xhci"
DEFAULT_PROFILE = "lenient"


@dataclass(frozen=True)
class IllegalEndpoint:
    config: int
    interface: int
    alternate: int
    address: int
    max_packet: int
    limit: int

    def kernel_message(self) -> str:
        """What Linux's descriptor parser logs when it clamps the value."""
        return (f"config {self.config} interface {self.interface} altsetting {self.alternate} endpoint "
                f"0x{self.address:X} has invalid maxpacket {self.max_packet}, setting to {self.limit}")


@dataclass(frozen=True)
class Admission:
    """The host's verdict on one enumeration: kernel log lines, and a refusal (an errno) or None."""

    warnings: tuple[str, ...] = ()
    refusal: int | None = None
    reason: str = ""


def illegal_endpoints(speed: str, config: bytes) -> list[IllegalEndpoint]:
    """Endpoints whose wMaxPacketSize exceeds what ``speed`` ("low", "full", ...) allows for their type."""
    limits = {"full": FULL_SPEED_MAX, "low": LOW_SPEED_MAX}.get(speed)
    if limits is None:
        return []
    found: list[IllegalEndpoint] = []
    value = config[5] if len(config) >= 9 and config[1] == CONFIGURATION else 1
    interface = alternate = 0
    i = 0
    while i + 2 <= len(config) and config[i] >= 2:
        length, kind = config[i], config[i + 1]
        if kind == INTERFACE and i + 4 <= len(config):
            interface, alternate = config[i + 2], config[i + 3]
        elif kind == ENDPOINT and i + 6 <= len(config):
            address, attributes = config[i + 2], config[i + 3]
            max_packet = int.from_bytes(config[i + 4:i + 6], "little") & 0x7FF
            limit = limits[attributes & 3]
            if max_packet > limit:
                found.append(IllegalEndpoint(value, interface, alternate, address, max_packet, limit))
        i += length
    return found


@dataclass(frozen=True)
class HostProfile:
    name: str
    refuses_illegal_max_packet: bool
    refusal: int = errno.EPROTO  # usbfs URB status -EPROTO: libusb LIBUSB_ERROR_IO

    def admit(self, speed: str, configs: tuple[bytes, ...]) -> Admission:
        illegal = [e for config in configs for e in illegal_endpoints(speed, config)]
        if not illegal:
            return Admission()
        if not self.refuses_illegal_max_packet:
            return Admission(tuple(e.kernel_message() for e in illegal))
        worst = illegal[0]
        return Admission((), self.refusal, f"{speed}-speed endpoint {worst.address:#04x} declares wMaxPacketSize "
                                           f"{worst.max_packet} (at most {worst.limit} allowed): device refused")


PROFILES = {
    "lenient": HostProfile("lenient", refuses_illegal_max_packet=False),
    "strict": HostProfile("strict", refuses_illegal_max_packet=True),
}


def controller_spec(text: str, known_kinds: tuple[str, ...]) -> tuple[str, HostProfile]:
    """``"ehci-strict"`` -> ("ehci", strict); a bare kind (``"xhci"``) is lenient, as Linux is."""
    kind, dash, profile = text.partition("-")
    profile = profile if dash else DEFAULT_PROFILE
    if kind not in known_kinds or profile not in PROFILES:
        choices = ", ".join(f"{k}-{p}" for k in known_kinds for p in PROFILES)
        raise InputError(f"USB host controller {text!r} is unknown; use one of {choices} (a bare kind is "
                         f"{DEFAULT_PROFILE})", stage="usb.transport")
    return kind, PROFILES[profile]
