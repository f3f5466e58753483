"""How a host controller and its driver treat a boot ROM: the evidenced behaviour, and labelled hypotheses.

Evidenced (usbboot issues; real-hardware-review.md):

* **lenient** (Linux, every public log): a device whose bulk endpoints declare more than full speed allows is
  clamped, not refused, with ``endpoint 0x1 has invalid maxpacket 512, setting to 64`` (a CM4 ROM fallen back
  to full speed behind a hub, usbboot #226). A BCM2835 ROM (0a5c:2763) at full speed logs no such warning
  (usbboot #69): its descriptors are legal there.

Hypotheses for the BCM2835 "slightly incorrect USB packet" that some ports refuse (the CM guide; nothing
public says which packet). None is confirmed; each is named as a hypothesis wherever it shows (the virtual
controller's root-hub product string, hence the report and the matrix), and each fails a 2835 ROM's transfers
with a different libusb result, so a real log can tell them apart:

* ``hypothesis-maxpacket``: the ROM declares 512-byte bulk packets at full speed after all and this host
  refuses rather than clamps; transaction error, libusb IO (-1), as ``Failed control transfer (-1,24)``
  (usbboot #73). Contradicted for Linux by #69.
* ``hypothesis-status``: the host's controller stalls the ROM's control transfers on the vendor request it
  cannot parse; libusb PIPE (-9), what Windows reports in #73.
* ``hypothesis-timeout``: the host's controller never completes a transfer to the full-speed ROM (a
  split-transaction problem of a high-speed hub); libusb TIMEOUT (-7), ``Failed control transfer (-7,24)``
  (usbboot #87, reported for xHCI and later ROMs too).

A profile judges a device when the transport enumerates it (:meth:`HostProfile.admit`); the transport logs the
kernel's warnings and, when refused, fails every transfer with the refusal's errno.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from hil.errors import InputError

CONFIGURATION, INTERFACE, ENDPOINT = 2, 4, 5
#: Largest wMaxPacketSize (bits 0-10) per transfer type (control, isochronous, bulk, interrupt), USB 2.0 5.5-5.8.
FULL_SPEED_MAX = (64, 1023, 64, 64)
LOW_SPEED_MAX = (8, 0, 0, 8)
DEFAULT_KIND = "xhci"
DEFAULT_PROFILE = "lenient"
BCM2835_ROM = (0x0A5C, 0x2763)  # the device the hypotheses are about


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
    """``hypothesis``: what an unconfirmed profile supposes ("" for the evidenced, lenient host); ``refusal``: the
    errno a 2835 ROM's transfers end with under the hypothesis."""

    name: str
    hypothesis: str = ""
    refusal: int | None = None

    def admit(self, speed: str, configs: tuple[bytes, ...], device: bytes = b"") -> Admission:
        illegal = [e for config in configs for e in illegal_endpoints(speed, config)]
        warnings = tuple(e.kernel_message() for e in illegal)
        if self.refusal is None or len(device) < 12 or struct.unpack_from("<HH", device, 8) != BCM2835_ROM:
            return Admission(warnings)
        return Admission(warnings, self.refusal, f"hypothesis {self.name.removeprefix('hypothesis-')}: "
                                                 f"{self.hypothesis}")

    @property
    def label(self) -> str:
        """How the virtual controller names itself (its root hub's product string) when it is a hypothesis."""
        return f" (hypothesis {self.name.removeprefix('hypothesis-')}, unconfirmed)" if self.hypothesis else ""


PROFILES = {
    "lenient": HostProfile("lenient"),
    "hypothesis-maxpacket": HostProfile(
        "hypothesis-maxpacket", "the 2835 ROM declares 512-byte bulk packets at full speed and this host refuses "
        "them instead of clamping (contradicted for Linux by usbboot #69)", errno.EPROTO),
    "hypothesis-status": HostProfile(
        "hypothesis-status", "this host stalls the 2835 ROM's vendor control transfers (PIPE, as Windows reports in "
        "usbboot #73)", errno.EPIPE),
    "hypothesis-timeout": HostProfile(
        "hypothesis-timeout", "this host's controller never completes a transfer to the full-speed 2835 ROM "
        "(TIMEOUT, as usbboot #87's (-7,24))", errno.ETIMEDOUT),
}
HYPOTHESES = tuple(name for name, profile in PROFILES.items() if profile.hypothesis)


def controller_spec(text: str, known_kinds: tuple[str, ...]) -> tuple[str, HostProfile]:
    """``"ehci-hypothesis-maxpacket"`` -> ("ehci", that profile); a bare kind (``"xhci"``) is lenient, as Linux
    is."""
    kind, dash, profile = text.partition("-")
    profile = profile if dash else DEFAULT_PROFILE
    if kind not in known_kinds or profile not in PROFILES:
        choices = ", ".join(f"{k}-{p}" for k in known_kinds for p in PROFILES)
        raise InputError(f"USB host controller {text!r} is unknown; use one of {choices} (a bare kind is "
                         f"{DEFAULT_PROFILE})", stage="usb.transport")
    return kind, PROFILES[profile]
