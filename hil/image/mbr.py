"""The MBR ("dos") partition table that Raspberry Pi OS images carry, read and written in pure Python.

Reading needs only the first sector, so the virtual module can look at its eMMC on every boot cheaply.
Logical partitions (inside an extended one) are not followed: Raspberry Pi OS never uses them.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hil.errors import ProductError

SECTOR = 512
SIGNATURE = b"\x55\xaa"
_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, first LBA, sector count
_TABLE = 446
_DISK_ID = 440
_STAGE = "image.mbr"


@dataclass(frozen=True)
class Partition:
    index: int  # 1-based, as in /dev/mmcblk0p<index> and PARTUUID=<disk id>-<index>
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type_id: int  # 0x0c FAT32 (LBA), 0x83 Linux, ...
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class DiskLayout:
    disk_id: int
    partitions: tuple[Partition, ...]

    def partition(self, index: int) -> Partition:
        for p in self.partitions:
            if p.index == index:
                return p
        raise ProductError(f"the partition table has no partition {index} "
                           f"(it has {', '.join(str(p.index) for p in self.partitions) or 'none'})",
                           stage=_STAGE, index=index)


def partuuid(disk_id: int, index: int) -> str:
    """The PARTUUID of an MBR partition as Raspberry Pi OS writes it in cmdline.txt: ``1a2b3c4d-02``."""
    return f"{disk_id:08x}-{index:02d}"


def read_layout(f: BinaryIO | Path | str) -> DiskLayout:
    """The partition table of an image file or block device. Raises ProductError if there is none."""
    if isinstance(f, str | Path):
        with open(f, "rb") as fh:
            return read_layout(fh)
    name = str(getattr(f, "name", "the disk"))
    f.seek(0)
    sector = f.read(SECTOR)
    disk_size = _size_of(f)
    if len(sector) < SECTOR or sector[510:512] != SIGNATURE:
        why = (f"it is only {len(sector)} bytes long" if len(sector) < SECTOR
               else "its first sector lacks the 0x55AA boot signature")
        raise _no_table(name, why)
    parts: list[Partition] = []
    for i in range(4):
        status, _, type_id, _, lba, count = _ENTRY.unpack_from(sector, _TABLE + i * _ENTRY.size)
        if status not in (0x00, 0x80):
            raise _no_table(name, f"entry {i + 1} has the invalid status byte 0x{status:02x}")
        if type_id == 0 or count == 0:
            continue
        if lba == 0:
            raise _no_table(name, f"partition {i + 1} starts at sector 0, over the partition table")
        parts.append(Partition(i + 1, lba * SECTOR, count * SECTOR, type_id, status == 0x80))
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise _no_table(name, f"partitions {a.index} and {b.index} overlap")
    for p in parts:
        if disk_size is not None and p.end > disk_size:
            raise ProductError(
                f"partition {p.index} of {name} ends at byte {p.end}, beyond the end of the disk "
                f"({disk_size} bytes): the image is truncated or larger than this disk",
                stage=_STAGE, partition=p.index, end=p.end, disk_size=disk_size)
    return DiskLayout(int.from_bytes(sector[_DISK_ID:_DISK_ID + 4], "little"), tuple(parts))


class _Head(io.BytesIO):
    """A disk's leading bytes that report the whole disk's size to :func:`read_layout`'s bounds check."""

    def __init__(self, data: bytes, size: int | None, name: str):
        super().__init__(data)
        self.name = name
        self._size = size

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == os.SEEK_END:
            if self._size is None:
                raise OSError("size unknown")
            return self._size
        return super().seek(pos, whence)


def layout_of(head: bytes, disk_size: int | None, name: str = "the disk") -> DiskLayout:
    """:func:`read_layout` on the first sector of a disk of ``disk_size`` bytes (None: unknown, unchecked)."""
    return read_layout(_Head(head[:SECTOR], disk_size, name))


def encode(layout: DiskLayout) -> bytes:
    """The first sector for ``layout`` (boot code area left zero, as the Pi's ROM never runs it)."""
    if len(layout.partitions) > 4:
        raise ValueError("an MBR holds at most 4 primary partitions")
    sector = bytearray(SECTOR)
    sector[_DISK_ID:_DISK_ID + 4] = layout.disk_id.to_bytes(4, "little")
    for p in layout.partitions:
        if p.start % SECTOR or p.size % SECTOR:
            raise ValueError(f"partition {p.index} is not sector aligned")
        first, count = p.start // SECTOR, p.size // SECTOR
        _ENTRY.pack_into(sector, _TABLE + (p.index - 1) * _ENTRY.size, 0x80 if p.bootable else 0,
                         _chs(first), p.type_id, _chs(first + count - 1), first, count)
    sector[510:512] = SIGNATURE
    return bytes(sector)


def _chs(lba: int) -> bytes:
    """Legacy cylinder/head/sector address (255 heads, 63 sectors), saturated as fdisk does past 8 GiB."""
    cyl, rest = divmod(lba, 255 * 63)
    if cyl > 1023:
        return b"\xfe\xff\xff"
    head, sec = divmod(rest, 63)
    return bytes((head, (sec + 1) | ((cyl >> 2) & 0xC0), cyl & 0xFF))


def _size_of(f: BinaryIO) -> int | None:
    try:
        return f.seek(0, os.SEEK_END)
    except OSError:
        return None


def _no_table(name: str, why: str) -> ProductError:
    return ProductError(f"no partition table on {name}: {why}. "
                        "Fix: write a Raspberry Pi OS-style image (MBR partition table)", stage=_STAGE)
