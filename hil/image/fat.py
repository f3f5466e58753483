"""Files on the FAT boot partition of an image or block device, without mounting it.

This machine's kernel has no vfat driver, and tests run without root anyway, so files go through
mtools (``-i IMAGE@@OFFSET`` addresses the partition inside the whole disk). Telling FAT32 from FAT16
is done here in Python from the boot sector, exactly as the FAT specification does it: by cluster count.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from hil.errors import ProductError
from hil.image.mbr import Partition
from hil.image.tools import errors, run

_STAGE = "image.fat"
_BPB = struct.Struct("<3s8sHBHBHHBHHHIIIHHI")  # boot sector fields up to BPB_FATSz32 and beyond
_PACKAGE = "mtools"


def fat_type(image: Path | str, part: Partition) -> str | None:
    """"FAT12", "FAT16" or "FAT32" for a valid FAT boot sector at the start of ``part``, else None."""
    with open(image, "rb") as f:
        f.seek(part.start)
        boot = f.read(512)
    return boot_sector_type(boot, part.size)


def boot_sector_type(boot: bytes, size: int) -> str | None:
    """"FAT12", "FAT16" or "FAT32" for a valid FAT boot sector of a volume of ``size`` bytes, else None."""
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa" or boot[0] not in (0xEB, 0xE9):
        return None
    (_, _, sector, per_cluster, reserved, fats, root_entries, total16, _, fat16, _, _, _,
     total32, fat32, *_) = _BPB.unpack_from(boot)
    fat_sectors, total = fat16 or fat32, total16 or total32
    if (sector not in (512, 1024, 2048, 4096) or per_cluster not in (1, 2, 4, 8, 16, 32, 64, 128)
            or not reserved or not fats or not fat_sectors or total * sector > size):
        return None
    root_sectors = (root_entries * 32 + sector - 1) // sector
    data = total - reserved - fats * fat_sectors - root_sectors
    if data <= 0:
        return None
    clusters = data // per_cluster
    return "FAT12" if clusters < 4085 else "FAT16" if clusters < 65525 else "FAT32"


def read_file(image: Path | str, part: Partition, name: str) -> bytes | None:
    """The contents of ``name`` (e.g. "config.txt", "overlays/x.dtbo"), or None if it is not there."""
    _check(image, part)
    proc = run(["mcopy", "-n", "-i", _drive(image, part), _path(name), "-"], package=_PACKAGE, check=False)
    if proc.returncode == 0:
        return proc.stdout
    if b"not found" in proc.stderr:
        return None
    raise _corrupt(image, part, f"reading {name} failed: {errors(proc)}")


def free_bytes(image: Path | str, part: Partition) -> int | None:
    """The free space mtools reports on the FAT file system (None if it cannot say)."""
    _check(image, part)
    proc = run(["mdir", "-i", _drive(image, part), "::/"], package=_PACKAGE, check=False)
    found = re.search(rb"([\d ]+) bytes free", proc.stdout)
    return int(found.group(1).replace(b" ", b"")) if proc.returncode == 0 and found else None


def write_file(image: Path | str, part: Partition, name: str, data: bytes) -> None:
    """Create or replace ``name``, creating its folders as needed."""
    _check(image, part)
    drive = _drive(image, part)
    parents = Path(name.strip("/")).parents
    folders = [_path(str(p)) for p in reversed(parents) if str(p) != "."]
    if folders:  # -D s: an existing folder is fine; a real failure shows up in the copy below
        run(["mmd", "-D", "s", "-i", drive, *folders], package=_PACKAGE, check=False)
    proc = run(["mcopy", "-o", "-i", drive, "-", _path(name)], package=_PACKAGE, input=data, check=False)
    if proc.returncode:
        raise _corrupt(image, part, f"writing {name} failed: {errors(proc)}")


def _check(image: Path | str, part: Partition) -> None:
    if fat_type(image, part) is None:
        raise _corrupt(image, part, "there is no valid FAT boot sector there")


def _drive(image: Path | str, part: Partition) -> str:
    return f"{image}@@{part.start}"


def _path(name: str) -> str:
    return "::/" + name.strip("/")


def _corrupt(image: Path | str, part: Partition, why: str) -> ProductError:
    return ProductError(f"FAT partition {part.index} of {image} (at byte {part.start}): {why}. "
                        "Fix: rebuild or rewrite the image; its boot partition is not usable FAT",
                        stage=_STAGE, image=str(image), partition=part.index)
