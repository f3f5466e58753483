"""The GUID partition table (UEFI spec, chapter 5.3), read only: enough to tell a real GPT disk image from
data that merely has a protective MBR, and to list where its partitions lie.

A GPT disk starts with a protective MBR (one partition of type 0xEE from sector 1); sector 1 holds the
header ("EFI PART", its own CRC32 over ``header_size`` bytes with the CRC field zeroed), which points at
an array of ``count`` entries of ``entry_size`` bytes, covered by a second CRC32. An entry whose type
GUID is all zeros is unused; the others span [first_lba, last_lba] inside the usable area.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from hil.errors import ProductError

SECTOR = 512
SIGNATURE = b"EFI PART"
PROTECTIVE_TYPE = 0xEE
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
_STAGE = "image.gpt"
MAX_ENTRIES_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GptPartition:
    index: int  # 1-based
    start: int  # bytes
    size: int  # bytes
    type_guid: bytes

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class GptLayout:
    entries_end: int  # byte just past the entry array: how much of the disk the table needs
    partitions: tuple[GptPartition, ...]


def entries_end(head: bytes) -> int:
    """How many leading bytes :func:`read_gpt` needs, from the header alone (0 if there is no header)."""
    if len(head) < 2 * SECTOR or head[SECTOR:SECTOR + 8] != SIGNATURE:
        return 0
    fields = _HEADER.unpack_from(head, SECTOR)
    entries_lba, count, entry_size = fields[10], fields[11], fields[12]
    return min(entries_lba * SECTOR + count * entry_size, 1 << 62)


def read_gpt(head: bytes, disk_size: int | None, name: str = "the disk") -> GptLayout:
    """Parse the primary GPT from the disk's leading bytes; ProductError says what is wrong with it."""
    def bad(why: str) -> ProductError:
        return ProductError(f"no valid GPT on {name}: {why}", stage=_STAGE)

    if len(head) < 2 * SECTOR or head[SECTOR:SECTOR + 8] != SIGNATURE:
        raise bad("sector 1 lacks the 'EFI PART' signature")
    (_, _, header_size, header_crc, _, my_lba, _, first_usable, last_usable, _, entries_lba, count,
     entry_size, entries_crc) = _HEADER.unpack_from(head, SECTOR)
    if not 92 <= header_size <= SECTOR:
        raise bad(f"header size {header_size} is outside 92..512")
    header = bytearray(head[SECTOR:SECTOR + header_size])
    header[16:20] = b"\0\0\0\0"
    if zlib.crc32(header) != header_crc:
        raise bad("the header's CRC32 does not match")
    if my_lba != 1:
        raise bad(f"the primary header says it lies at sector {my_lba}, not 1")
    if entry_size < 128 or entry_size & (entry_size - 1) or count * entry_size > MAX_ENTRIES_BYTES:
        raise bad(f"{count} entries of {entry_size} bytes is not a partition array")
    if entries_lba < 2:
        raise bad(f"the entry array at sector {entries_lba} overlaps the header")
    end = entries_lba * SECTOR + count * entry_size
    if len(head) < end:
        raise bad(f"the entry array ends at byte {end}, past the {len(head)} bytes there are")
    array = head[entries_lba * SECTOR:end]
    if zlib.crc32(array) != entries_crc:
        raise bad("the partition entries' CRC32 does not match")
    if first_usable > last_usable or first_usable * SECTOR < end:
        raise bad(f"usable sectors {first_usable}-{last_usable} overlap the table")
    if disk_size is not None and (last_usable + 1) * SECTOR > disk_size:
        raise bad(f"its usable area ends at byte {(last_usable + 1) * SECTOR}, past the end ({disk_size} bytes): "
                  "the image is truncated or made for a larger disk")
    parts = []
    for i in range(count):
        type_guid, _, first, last, _, _ = _ENTRY.unpack_from(array, i * entry_size)
        if type_guid == bytes(16):
            continue
        if not first_usable <= first <= last <= last_usable:
            raise bad(f"partition {i + 1} (sectors {first}-{last}) lies outside the usable sectors "
                      f"{first_usable}-{last_usable}")
        parts.append(GptPartition(i + 1, first * SECTOR, (last - first + 1) * SECTOR, type_guid))
    ordered = sorted(parts, key=lambda p: p.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise bad(f"partitions {a.index} and {b.index} overlap")
    return GptLayout(end, tuple(parts))
