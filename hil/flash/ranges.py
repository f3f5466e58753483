"""Which byte ranges of an image matter, so that a flash writes (and verifies) only those.

Zeros in a compressed image are not holes: the answer comes from a ``.bmap`` (bmap-tools' XML), from
the holes of a sparse raw image (``SEEK_DATA``/``SEEK_HOLE``, what ``bmaptool create`` records), or from
the image's own filesystems as they stream past: the MBR, each FAT's cluster table and each ext4 block
group's bitmap. Filesystem metadata precedes the data it describes in images mkfs makes, so a stream
can be planned as it is decoded; whatever is not yet known is treated as mapped (never skipped).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
import stat
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hil.errors import InputError, ProductError
from hil.image.mbr import DiskLayout, Partition, read_layout

ALIGN = 4096  # every range is widened to this, so O_DIRECT writes stay aligned
Extent = tuple[int, int]  # [start, end) in bytes
_STAGE = "flash.ranges"
_FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}
_EXT4_MAGIC = 0xEF53
_BLOCK_UNINIT = 0x2
_GDT_CSUM, _METADATA_CSUM = 0x10, 0x400  # ro_compat features that make bg_itable_unused trustworthy


def merge(ranges: Iterable[Extent], limit: int | None = None) -> list[Extent]:
    """Sorted, aligned outward to :data:`ALIGN`, clipped to ``limit`` and with touching ranges joined."""
    out: list[Extent] = []
    for start, end in sorted(ranges):
        start, end = start // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN
        if limit is not None:
            end = min(end, limit)
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def subtract(ranges: list[Extent], holes: list[Extent]) -> list[Extent]:
    """``ranges`` without ``holes`` (both sorted, non-overlapping)."""
    out = []
    for start, end in ranges:
        for h_start, h_end in holes:
            if h_end <= start or h_start >= end:
                continue
            if h_start > start:
                out.append((start, h_start))
            start = max(start, h_end)
        if start < end:
            out.append((start, end))
    return out


def total(ranges: Iterable[Extent]) -> int:
    return sum(end - start for start, end in ranges)


class Plan(Protocol):
    """What to write: asked chunk by chunk in stream order, told each chunk's bytes as they arrive."""

    def mapped(self, start: int, end: int) -> list[Extent]: ...

    def learn(self, offset: int, data: memoryview) -> None: ...


class FixedRanges:
    """A plan known before the first byte: from a .bmap, a sparse file or a cache entry."""

    def __init__(self, ranges: Iterable[Extent]):
        self.ranges = merge(ranges)
        self._ends = [end for _, end in self.ranges]

    def mapped(self, start: int, end: int) -> list[Extent]:
        out = []
        for s, e in self.ranges[bisect.bisect_right(self._ends, start):]:
            if s >= end:
                break
            out.append((max(s, start), min(e, end)))
        return out

    def learn(self, offset: int, data: memoryview) -> None:
        return None


@dataclass(frozen=True)
class Bmap:
    path: Path
    image_size: int
    block_size: int
    ranges: list[Extent]
    checksum_type: str | None = None  # a hashlib name: sha256 (format 2.0 and later), sha1 (1.x)
    checksums: tuple[tuple[int, int, str], ...] = ()  # (start, end, hex digest) of each listed range

    @property
    def mapped_bytes(self) -> int:
        return total(self.ranges)


_CHECKSUM_TYPES = ("sha256", "sha1", "md5")


def read_bmap(path: Path) -> Bmap:
    """Parse a bmap file (bmaptool's format 1.x to 2.x): image size, block size, the mapped block ranges and
    their checksums. The file's own checksum (BmapFileChecksum, taken with its value zeroed) must match."""
    def bad(why: str) -> InputError:
        return InputError(f"{path} is not a usable .bmap file: {why}. Fix: regenerate it with `bmaptool create` "
                          "or remove it (the flash then finds the mapped ranges itself)", stage=_STAGE)

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise bad("it is not a regular file")
        with open(path, "rb") as f:
            raw = f.read(64 * 1024**2)
        root = ET.fromstring(raw)
        image_size = int((root.findtext("ImageSize") or "").strip())
        block_size = int((root.findtext("BlockSize") or "").strip())
        major = int((root.get("version") or "1.0").split(".")[0])
    except (ET.ParseError, ValueError, OSError) as e:
        raise bad(str(e) or "ImageSize or BlockSize missing") from None
    if image_size <= 0 or block_size <= 0 or block_size % 512:
        raise bad(f"image size {image_size} / block size {block_size}")
    kind = (root.findtext("ChecksumType") or "").strip().lower() if major >= 2 else "sha1"
    if kind and kind not in _CHECKSUM_TYPES:
        raise bad(f"unknown ChecksumType {kind!r}")
    attribute = "chksum" if major >= 2 else "sha1"
    own = (root.findtext("BmapFileChecksum") or root.findtext("BmapFileSHA1") or "").strip()
    if own and kind:
        algo = "sha1" if root.find("BmapFileSHA1") is not None else kind
        if hashlib.new(algo, raw.replace(own.encode(), b"0" * len(own))).hexdigest() != own.lower():
            raise bad("its own checksum (BmapFileChecksum) does not match: the file was changed after bmaptool "
                      "wrote it")
    ranges = []
    checksums = []
    for item in root.iterfind("BlockMap/Range"):
        first, _, last = (item.text or "").strip().partition("-")
        try:
            a, b = int(first), int(last or first)
        except ValueError:
            raise bad(f"range {item.text!r}") from None
        if a < 0 or b < a or (b + 1) * block_size > -(-image_size // block_size) * block_size:
            raise bad(f"range {item.text!r} lies outside the {image_size}-byte image")
        extent = (a * block_size, min((b + 1) * block_size, image_size))
        ranges.append(extent)
        digest = (item.get(attribute) or "").strip().lower()
        if digest and kind:
            if len(digest) != hashlib.new(kind).digest_size * 2 or any(c not in "0123456789abcdef" for c in digest):
                raise bad(f"range {item.text!r} has the malformed {kind} checksum {digest!r}")
            checksums.append((*extent, digest))
    checksums.sort()
    for (_, end, _), (start, _, _) in zip(checksums, checksums[1:], strict=False):
        if start < end:
            raise bad(f"ranges overlap at byte {start}")
    return Bmap(path, image_size, block_size, merge(ranges), kind or None, tuple(checksums))


def sparse_ranges(path: Path) -> list[Extent] | None:
    """The data (non-hole) ranges of a raw image, or None when it has no holes (nothing to learn)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out: list[Extent] = []
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole up to the end
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole))
            pos = hole
    finally:
        os.close(fd)
    if out == [(0, size)]:
        return None
    return merge(out, -(-size // 512) * 512)


class _SizedSector(io.BytesIO):
    """The first sector, posing as a disk of the image's size for the MBR reader's bounds check."""

    def __init__(self, data: bytes, size: int):
        super().__init__(data)
        self.name = "the image"
        self._size = size

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._size if whence == os.SEEK_END else super().seek(pos, whence)


class _Collector:
    """Bytes of one absolute range, gathered from whichever chunks cover it."""

    def __init__(self, start: int, length: int):
        self.start, self.end = start, start + length
        self.buf = bytearray(length)
        self.missing = length

    def take(self, offset: int, data: memoryview) -> bool:
        """Copy what ``data`` (at ``offset``) holds of the range; True once the range is complete."""
        s, e = max(self.start, offset), min(self.end, offset + len(data))
        if s < e:
            self.buf[s - self.start:e - self.start] = data[s - offset:e - offset]
            self.missing -= e - s
        return self.missing <= 0


def _runs(bits: bytes) -> list[tuple[int, int]]:
    """Runs of set bits (bit i of byte j is item 8*j+i, as in ext4 bitmaps), as [first, last+1)."""
    x = int.from_bytes(bits, "little")
    out = []
    base = 0
    while x:
        low = (x & -x).bit_length() - 1
        x >>= low
        base += low
        ones = (~x & (x + 1)).bit_length() - 1
        out.append((base, base + ones))
        x >>= ones
        base += ones
    return out


class _Filesystem:
    """One partition's allocation, learnt from its metadata; ``extents`` None while not known."""

    def __init__(self, part: Partition):
        self.part = part
        self.extents: FixedRanges | None = None

    def mapped(self, start: int, end: int) -> list[Extent]:
        return [(start, end)] if self.extents is None else self.extents.mapped(start, end)

    def learn(self, offset: int, data: memoryview) -> None:
        return None


class _Fat(_Filesystem):
    """Boot sector, reserved sectors, FATs and root folder are mapped; of the clusters, those in use."""

    def __init__(self, part: Partition):
        super().__init__(part)
        self._head: _Collector | None = _Collector(part.start, 512)
        self._tables: _Collector | None = None
        self._geometry = (0, 0, 0, 0)  # data start (bytes into the partition), cluster bytes, clusters, entry

    def learn(self, offset: int, data: memoryview) -> None:
        if self._head is not None and self._head.take(offset, data):
            boot = bytes(self._head.buf)
            self._head = None
            sector, per_cluster, reserved, fats, root_entries, total16, fat16 = struct.unpack_from(
                "<HBHBHHxH", boot, 11)
            total32, fat32 = struct.unpack_from("<II", boot, 32)
            fat_sectors, total_sectors = fat16 or fat32, total16 or total32
            if boot[510:512] != b"\x55\xaa" or not sector or not per_cluster or not fat_sectors or not fats:
                self.extents = FixedRanges([(self.part.start, self.part.end)])  # not FAT after all
                return
            data_start = (reserved + fats * fat_sectors) * sector + (root_entries * 32 + sector - 1) // sector * sector
            clusters = (total_sectors * sector - data_start) // (per_cluster * sector)
            if clusters < 4085:  # FAT12: too small to be worth planning
                self.extents = FixedRanges([(self.part.start, self.part.end)])
                return
            entry = 2 if clusters < 65525 else 4
            self._geometry = (data_start, per_cluster * sector, clusters, entry)
            self._tables = _Collector(self.part.start + reserved * sector, (clusters + 2) * entry)
        if self._tables is not None and self._tables.take(offset, data):
            data_start, cluster, clusters, entry = self._geometry
            table = memoryview(self._tables.buf).cast("H" if entry == 2 else "I")
            mask = 0xFFFF if entry == 2 else 0x0FFFFFFF
            base = self.part.start + data_start
            ranges = [(self.part.start, base)]
            run_start = -1
            for i in range(2, clusters + 2):
                used = table[i] & mask
                if used and run_start < 0:
                    run_start = i
                elif not used and run_start >= 0:
                    ranges.append((base + (run_start - 2) * cluster, base + (i - 2) * cluster))
                    run_start = -1
            if run_start >= 0:
                ranges.append((base + (run_start - 2) * cluster, base + clusters * cluster))
            self._tables = None
            self.extents = FixedRanges(ranges)


class _Ext4(_Filesystem):
    """Superblock and group descriptors first; then each block group as its block bitmap goes by.

    Groups whose bitmap was never initialised (BLOCK_UNINIT) hold only their superblock backup and group
    descriptor copy; every group's bitmaps and inode table are mapped wherever they lie."""

    def __init__(self, part: Partition):
        super().__init__(part)
        self._super: _Collector | None = _Collector(part.start + 1024, 1024)
        self._gdt: _Collector | None = None
        self._pending: dict[int, _Collector] = {}  # group -> its bitmap being collected
        self._groups: dict[int, FixedRanges] = {}  # group -> allocated extents, once known
        self._meta = FixedRanges([])
        self._unread = FixedRanges([])  # allocated in the bitmaps, but never read: unused inode table tails
        self._block = self._per_group = self._first = self._count = 0

    def mapped(self, start: int, end: int) -> list[Extent]:
        if not self._block:
            return [(start, end)]
        out = list(self._meta.mapped(start, end))
        group_bytes = self._per_group * self._block
        fs_start = self.part.start + self._first * self._block
        fs_end = min(self.part.end, self.part.start + self._count * self._block)
        if start < fs_start:
            out.append((start, min(end, fs_start)))
        pos = max(start, fs_start)
        while pos < min(end, fs_end):
            group = (pos - fs_start) // group_bytes
            g_start = fs_start + group * group_bytes
            g_end = min(g_start + group_bytes, fs_end, end)
            known = self._groups.get(group)
            out += [(pos, g_end)] if known is None else known.mapped(pos, g_end)
            pos = g_end
        return subtract(merge(out), self._unread.mapped(start, end))

    def learn(self, offset: int, data: memoryview) -> None:
        if self._super is not None and self._super.take(offset, data):
            self._parse_super(bytes(self._super.buf))
            self._super = None
        if self._gdt is not None and self._gdt.take(offset, data):
            self._parse_gdt(bytes(self._gdt.buf))
            self._gdt = None
        for group, collector in list(self._pending.items()):
            if collector.take(offset, data):
                del self._pending[group]
                base = self.part.start + (self._first + group * self._per_group) * self._block
                self._groups[group] = FixedRanges((base + a * self._block, base + b * self._block)
                                                  for a, b in _runs(bytes(collector.buf)))

    def _parse_super(self, sb: bytes) -> None:
        magic, = struct.unpack_from("<H", sb, 0x38)
        if magic != _EXT4_MAGIC:
            self.extents = FixedRanges([(self.part.start, self.part.end)])
            return
        count_lo, _, _, _, first, log_block, _, per_group = struct.unpack_from("<8I", sb, 4)
        inodes_per_group, = struct.unpack_from("<I", sb, 0x28)
        incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
        reserved_gdt, = struct.unpack_from("<H", sb, 0xCE)
        desc_size, = struct.unpack_from("<H", sb, 0xFE)
        inode_size, = struct.unpack_from("<H", sb, 0x58)
        count_hi, = struct.unpack_from("<I", sb, 0x150)
        is64 = bool(incompat & 0x80)
        self._desc = desc_size if is64 and desc_size >= 64 else 32
        self._block = 1024 << log_block
        self._per_group, self._first = per_group, first
        self._count = count_lo | (count_hi << 32 if is64 else 0)
        self._groups_n = -(-(self._count - first) // per_group)
        self._sparse = bool(ro_compat & 0x1)
        self._gdt_blocks = -(-self._groups_n * self._desc // self._block) + reserved_gdt
        self._itable_blocks = -(-inodes_per_group * inode_size // self._block)
        self._ipg, self._inode_size = inodes_per_group, inode_size
        self._csum = bool(ro_compat & (_GDT_CSUM | _METADATA_CSUM))
        self._is64 = is64
        self._gdt = _Collector(self.part.start + (first + 1) * self._block, self._groups_n * self._desc)

    def _parse_gdt(self, gdt: bytes) -> None:
        meta: list[Extent] = []
        unread: list[Extent] = []
        at = self.part.start
        for g in range(self._groups_n):
            d = gdt[g * self._desc:(g + 1) * self._desc]
            bitmap, inode_bitmap, table = struct.unpack_from("<III", d, 0)
            flags, = struct.unpack_from("<H", d, 0x12)
            if self._is64 and self._desc >= 64:
                hi = struct.unpack_from("<III", d, 0x20)
                bitmap, inode_bitmap, table = (lo | h << 32 for lo, h in zip((bitmap, inode_bitmap, table), hi,
                                                                             strict=True))
            used = self._itable_blocks
            if self._csum:  # inodes past the group's used count are never read (e2fsck, kernel)
                unused, = struct.unpack_from("<H", d, 0x1C)
                if self._is64 and self._desc >= 64:
                    unused |= struct.unpack_from("<H", d, 0x32)[0] << 16
                used = -(-max(0, self._ipg - unused) * self._inode_size // self._block)
                unread.append((at + (table + used) * self._block, at + (table + self._itable_blocks) * self._block))
            meta += [(at + bitmap * self._block, at + (bitmap + 1) * self._block),
                     (at + inode_bitmap * self._block, at + (inode_bitmap + 1) * self._block),
                     (at + table * self._block, at + (table + used) * self._block)]
            base = at + (self._first + g * self._per_group) * self._block
            if flags & _BLOCK_UNINIT:
                has_super = g in (0, 1) or not self._sparse or any(_power_of(g, p) for p in (3, 5, 7))
                self._groups[g] = FixedRanges([(base, base + (1 + self._gdt_blocks) * self._block)] if has_super
                                              else [])
            else:
                self._pending[g] = _Collector(at + bitmap * self._block, self._per_group // 8)
        self._meta = FixedRanges(meta)
        self._unread = FixedRanges(unread)


def _power_of(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


class AllocationMap:
    """A plan learnt from the image as it streams: MBR first, then each partition's filesystem.

    Bytes before the first partition (MBR, boot loaders) are mapped; bytes outside every partition after
    it are not. A partition that is neither FAT nor ext4 is mapped whole. Without an MBR, all is mapped."""

    def __init__(self, image_size: int | None):
        self.image_size = image_size
        self._head: _Collector | None = _Collector(0, 512)
        self._layout: DiskLayout | None = None
        self._parts: list[_Filesystem] = []
        self._all = False

    @property
    def layout(self) -> DiskLayout | None:
        return self._layout

    def mapped(self, start: int, end: int) -> list[Extent]:
        if self._all or self._layout is None:
            return [(start, end)]
        out: list[Extent] = []
        first = min(p.part.start for p in self._parts)
        if start < first:
            out.append((start, min(end, first)))
        for fs in self._parts:
            s, e = max(start, fs.part.start), min(end, fs.part.end)
            if s < e:
                out += fs.mapped(s, e)
        return merge(out)

    def learn(self, offset: int, data: memoryview) -> None:
        if self._head is not None:
            if not self._head.take(offset, data):
                return
            sector, self._head = bytes(self._head.buf), None
            try:
                self._layout = read_layout(_SizedSector(sector, self.image_size or 1 << 62))
            except ProductError:
                self._all = True  # no partition table: nothing to plan by
                return
            if not self._layout.partitions:
                self._all = True
                return
            self._parts = [_Fat(p) if p.type_id in _FAT_TYPES else _Ext4(p) if p.type_id == 0x83
                           else _Filesystem(p) for p in self._layout.partitions]
            for fs in self._parts:
                if type(fs) is _Filesystem:
                    fs.extents = FixedRanges([(fs.part.start, fs.part.end)])
        for fs in self._parts:
            if fs.part.start < offset + len(data) and offset < fs.part.end:
                fs.learn(offset, data)
