"""What a virtual module's boot says and how it ends: the vocabulary every boot stage shares.

Each stage is a generator of :class:`Emit` (what appears on the UART, after a delay in hardware seconds)
whose return value is an :data:`Outcome`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

from hil.image import ext4, fat
from hil.image.mbr import Partition

BOOTLOADER_BAUD = 115200  # the EEPROM bootloader's BOOT_UART rate
BOOT_MOUNT = "/boot/firmware"  # where Raspberry Pi OS mounts the boot partition

@dataclass(frozen=True)
class Emit:
    delay: float  # hardware seconds after the previous output
    text: str
    baud: int | None = BOOTLOADER_BAUD  # the rate it is sent at; None: no UART involved (echo)


@dataclass(frozen=True)
class UsbFallback:
    """The ROM found nothing to boot on the eMMC and waits as a USB device (CM1, CM3, CM4S)."""


@dataclass(frozen=True)
class Reboot:
    """The kernel gave up and restarts the SoC (``panic=N``)."""


@dataclass(frozen=True)
class System:
    """A kernel that reached userspace: what its shell and getty know."""

    image: Path
    root: Partition
    hostname: str
    tty: str
    baud: int  # the serial console's rate, from console=
    release: str  # uname -r
    version: str  # uname -v
    machine: str  # uname -m
    issue: str  # /etc/issue, escapes expanded
    show_status: bool  # systemd's status lines reach the UART (it is /dev/console, not quiet)
    proc: dict[str, bytes] = field(default_factory=dict)  # files that exist only at run time
    boot: Partition | None = None  # the FAT boot partition, mounted at /boot/firmware

    def read(self, path: str) -> bytes | None:
        """A file of the running system, read from the eMMC now (the root filesystem, /boot/firmware, /proc)."""
        if path in self.proc:
            return self.proc[path]
        if path.startswith(BOOT_MOUNT + "/") and self.boot is not None:
            return fat.read_file(self.image, self.boot, path[len(BOOT_MOUNT) + 1:])
        return ext4.read_file(self.image, self.root, path)


@dataclass(frozen=True)
class Stuck:
    """The boot goes no further; the UART stays silent from here on. ``why`` is for the journal."""

    why: str


Outcome = System | UsbFallback | Reboot | Stuck



class NothingToBoot:
    """A boot mode found nothing: the bootloader moves on to its next mode."""


BootLog = Generator[Emit, None, Outcome]
