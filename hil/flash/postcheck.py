"""Before and after the write: the CM3 boot-partition lint, the partition check, boot options.

Raspberry Pi's Compute Module guide says the boot ROM of the older modules (no SPI bootloader) finds the
firmware on a FAT32 partition starting at 4 MiB; images that break it flash fine and then never boot,
so the lint warns before a byte is written. After the write the disk's table is read again and the
FAT boot and Linux root partitions of a Raspberry Pi OS image must be there. config.txt and cmdline.txt
are edited with mtools, through ``/proc/PID/fd/N`` of the guarded file descriptor: the very device that
was checked, with no mount and no device name that could mean another disk to a child process.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hil.errors import InputError, ProductError
from hil.flash.sources import Image, head
from hil.image import ext4, fat
from hil.image.mbr import SECTOR, DiskLayout, Partition, read_layout
from hil.models import ModuleModel

STAGE = "flash.postcheck"
BOOT_START = 4 * 1024**2
FAT_TYPE_IDS = frozenset({0x0B, 0x0C})  # FAT32 (CHS), FAT32 (LBA)
_ANY_FAT = FAT_TYPE_IDS | {0x01, 0x04, 0x06, 0x0E}
_REPEATABLE = ("dtoverlay", "dtparam")
_BLKRRPART = 0x125F
_BLKFLSBUF = 0x1261


def device_path(fd: int) -> str:
    """A path that reaches exactly the open disk, in this process and in its children."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def needs_boot_lint(model: ModuleModel) -> bool:
    """Modules without an SPI bootloader EEPROM boot from the ROM's own FAT reader (CM1, CM3, CM3+, CM4S)."""
    return not model.has_eeprom


def lint_layout(layout: DiskLayout, fat_kind: str | None, model: ModuleModel) -> list[str]:
    """Warnings against the CM3 rule (boot partition FAT32 at 4 MiB); empty when it holds or does not apply."""
    if not needs_boot_lint(model):
        return []
    if not layout.partitions:
        return [f"the image has no partitions; a {model.name} boots from a FAT32 partition at 4 MiB"]
    first = min(layout.partitions, key=lambda p: p.start)
    out = []
    if first.type_id not in FAT_TYPE_IDS:
        out.append(f"partition {first.index} has type 0x{first.type_id:02x}, not FAT32 (0x0c): "
                   f"a {model.name} boot ROM will not find its firmware")
    if first.start != BOOT_START:
        out.append(f"the boot partition starts at byte {first.start}, not at 4 MiB ({BOOT_START}) as a "
                   f"{model.name} needs (Raspberry Pi's Compute Module guide)")
    if fat_kind != "FAT32":
        out.append(f"the boot partition is formatted {fat_kind or 'as no FAT at all'}, not FAT32: a "
                   f"{model.name} boot ROM reads FAT32")
    return out


def lint_image(image: Image, model: ModuleModel) -> list[str]:
    """The CM3 lint on an image before flashing: only its first sectors are decoded."""
    if not needs_boot_lint(model):
        return []
    first = head(image, SECTOR)
    try:
        layout = read_layout(LeadingBytes(first, image.size))
    except ProductError:
        return [f"the image has no MBR partition table; a {model.name} boots from a FAT32 partition at 4 MiB"]
    if not layout.partitions:
        return lint_layout(layout, None, model)
    boot = min(layout.partitions, key=lambda p: p.start)
    data = head(image, boot.start + SECTOR)
    return lint_layout(layout, _fat_kind(data, boot), model)


class LeadingBytes(io.BytesIO):
    """Some leading bytes of an image that say the whole image's size to the MBR reader."""

    def __init__(self, data: bytes, size: int | None):
        super().__init__(data)
        self.name = "the image"
        self._size = size if size is not None else 1 << 62

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._size if whence == os.SEEK_END else super().seek(pos, whence)


def _fat_kind(data: bytes, part: Partition) -> str | None:
    """fat.fat_type on decoded bytes: the boot sector goes at its offset in a sparse in-memory file."""
    fd = os.memfd_create("hil-boot-sector")
    try:
        os.pwrite(fd, data[part.start:part.start + SECTOR], part.start)
        return fat.fat_type(f"/proc/self/fd/{fd}", part)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class PartitionCheck:
    layout: DiskLayout
    boot: Partition
    root: Partition
    boot_fat: str
    reread: bool  # the kernel re-read the table (False: it has no parser for it, or the disk is a file)


def check_partitions(fd: int, device: str) -> PartitionCheck:
    """Re-read the table and require a FAT boot partition and an ext4 Linux root (ProductError if not)."""
    with contextlib.suppress(OSError):  # not a block device, or no buffers to drop
        fcntl.ioctl(fd, _BLKFLSBUF)
    try:
        fcntl.ioctl(fd, _BLKRRPART)
        reread = True
    except OSError:
        reread = False
    path = device_path(fd)
    try:
        with open(path, "rb", buffering=0) as f:
            f.name = device  # messages name the disk, not /proc/PID/fd/N
            layout = read_layout(f)
    except ProductError as e:
        raise ProductError(f"after the write {device} has no usable partition table: {e.message}",
                           stage=STAGE) from None
    boot = next((p for p in layout.partitions if p.type_id in _ANY_FAT), None)
    root = next((p for p in layout.partitions if p.type_id == 0x83), None)
    if boot is None or root is None:
        found = ", ".join(f"{p.index}: type 0x{p.type_id:02x}" for p in layout.partitions) or "none"
        raise ProductError(f"after the write {device} lacks the {'FAT boot' if boot is None else 'Linux root'} "
                           f"partition of a Raspberry Pi OS image (partitions {found}). Fix: check the image",
                           stage=STAGE, partitions=found)
    kind = fat.fat_type(path, boot)
    if kind is None:
        raise ProductError(f"partition {boot.index} of {device} is typed FAT but holds no FAT file system. "
                           "Fix: check the image", stage=STAGE)
    if not ext4.is_ext4(path, root):
        raise ProductError(f"partition {root.index} of {device} is typed Linux but holds no ext4 file system. "
                           "Fix: check the image", stage=STAGE)
    return PartitionCheck(layout, boot, root, kind, reread)


def set_config(text: str, options: Mapping[str, str]) -> str:
    """config.txt with each ``key=value`` set: an active line for the key is replaced, else one is added
    under a final ``[all]`` section (so no conditional section above swallows it). ``dtoverlay`` and
    ``dtparam`` may appear many times, so they are only added (once)."""
    lines = text.splitlines()
    section = "[all]"
    for key, value in options.items():
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if key in _REPEATABLE:
            if f"{key}={value}" in (line.strip() for line in lines):
                continue
            hits = []
        if hits:
            lines[hits[-1]] = f"{key}={value}"
            continue
        sections = [line.strip() for line in lines if line.strip().startswith("[")]
        if sections and sections[-1] != section:
            lines.append(section)
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def set_cmdline(text: str, args: Sequence[str]) -> str:
    """cmdline.txt (one line) with each argument set: ``key=value`` takes the place of every ``key=``
    already there (``console=`` included, which then names one console), a flag is added once."""
    words = text.split()
    for arg in args:
        if not arg or any(c.isspace() for c in arg):
            raise InputError(f"kernel argument {arg!r} is empty or contains white space", stage=STAGE)
        key = arg.split("=", 1)[0] + "=" if "=" in arg else None
        hits = [i for i, w in enumerate(words) if (w.startswith(key) if key else w == arg)]
        if hits:
            words[hits[0]] = arg
            words = [w for i, w in enumerate(words) if i not in hits[1:]]
        else:
            words.append(arg)
    return " ".join(words) + "\n"


def set_boot_options(fd: int, device: str, boot: Partition, config: Mapping[str, str] | None = None,
                     cmdline: Sequence[str] = ()) -> None:
    """Edit config.txt / cmdline.txt on the written disk's boot partition, without mounting, then fsync."""
    path = device_path(fd)
    for name, edit in (("config.txt", lambda t: set_config(t, config or {})),
                       ("cmdline.txt", lambda t: set_cmdline(t, cmdline))):
        if (name == "config.txt" and not config) or (name == "cmdline.txt" and not cmdline):
            continue
        old = fat.read_file(path, boot, name)
        if old is None and name == "cmdline.txt":
            raise ProductError(f"{device} has no cmdline.txt on its boot partition to add kernel arguments to",
                               stage=STAGE)
        fat.write_file(path, boot, name, edit((old or b"").decode(errors="replace")).encode())
    os.fsync(fd)
