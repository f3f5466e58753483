"""A USB port path, ``BUS-PORT[.PORT...]``, as the kernel names the device in sysfs (``lsusb -t``, ``rpiboot -p``).

Parsed once, where it enters (the rig file, a command line), and carried as a :class:`UsbPort` everywhere after:
selection, discovery, the guard, the host-controller lookup and the virtual bus. A :class:`UsbPort` is the path
string itself, so it compares equal to the sysfs name a udev device reports, with the numbers parsed beside it.

Depth: Linux refuses a hub nested deeper than level 5 ("hub nested too deep", drivers/usb/core/hub.c,
MAX_TOPO_LEVEL 6), so a device sits behind at most five hubs: a root port and up to five hub ports.
"""

from __future__ import annotations

import re

from hil.errors import InputError

MAX_DEPTH = 6  # port numbers in a path: the root port plus at most five hubs' ports
_PATH = re.compile(rf"^(\d+)-(\d+(?:\.\d+){{0,{MAX_DEPTH - 1}}})$")
EXAMPLE = "1-1.3"


class UsbPort(str):
    """``BUS-PORT[.PORT...]``: ``bus`` and the port numbers (``ports``) from the root hub outwards."""

    bus: int
    ports: tuple[int, ...]

    def __new__(cls, text: str) -> UsbPort:
        if isinstance(text, UsbPort):
            return text
        m = _PATH.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise InputError(f"{text!r} is not a USB port path. Fix: write it as sysfs names the port, "
                             f"BUS-PORT[.PORT...] with at most {MAX_DEPTH} ports, e.g. {EXAMPLE}", stage="usb.port")
        self = super().__new__(cls, f"{int(m[1])}-{'.'.join(str(int(p)) for p in m[2].split('.'))}")
        self.bus = int(m[1])
        self.ports = tuple(int(p) for p in m[2].split("."))
        return self

    @classmethod
    def parse(cls, text: str) -> UsbPort:
        return cls(text)

    @staticmethod
    def valid(text: object) -> bool:
        """Whether ``text`` is a port path (for validators that word their own message)."""
        return isinstance(text, str) and _PATH.match(text.strip()) is not None

    @property
    def hub(self) -> UsbPort | None:
        """The port of the hub this port belongs to (None for a root port)."""
        return UsbPort(f"{self.bus}-{'.'.join(map(str, self.ports[:-1]))}") if len(self.ports) > 1 else None
