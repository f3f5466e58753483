"""Files on the ext4 root partition of an image or block device, without mounting it.

debugfs (e2fsprogs) opens ``IMAGE?offset=N`` through its unix I/O manager. It runs in catastrophic mode
(``-c``: no bitmaps read), so a lookup costs a few milliseconds even on a large filesystem. Its ``cat``
does not follow a final symlink (Debian's /etc/os-release is one), so links are resolved here.
"""

from __future__ import annotations

import posixpath
import re
import struct
from pathlib import Path

from hil.errors import InputError, ProductError
from hil.image.mbr import Partition
from hil.image.tools import run

_STAGE = "image.ext4"
_MAGIC = 0xEF53
_INCOMPAT_EXTENTS = 0x40
_MAX_LINKS = 8
# The banner debugfs prints on stderr on every run; anything else there is a problem.
_BANNER = re.compile(rb"^debugfs \d")
_TYPE = re.compile(rb"Type: (\w+)")
_FAST_LINK = re.compile(rb'Fast link dest: "(.*)"')


def is_ext4(image: Path | str, part: Partition) -> bool:
    """True if ``part`` starts with an ext4 superblock (ext2/3 lack the extents feature)."""
    with open(image, "rb") as f:
        f.seek(part.start + 1024)
        sb = f.read(1024)
    if len(sb) < 1024:
        return False
    magic, = struct.unpack_from("<H", sb, 56)
    incompat, = struct.unpack_from("<I", sb, 96)
    return magic == _MAGIC and bool(incompat & _INCOMPAT_EXTENTS)


def read_file(image: Path | str, part: Partition, path: str) -> bytes | None:
    """The contents of the file at absolute ``path``, following symlinks; None if it does not exist."""
    if not path.startswith("/") or any(c in path for c in '"\n\\'):
        raise InputError(f"{path!r} is not a plain absolute path inside the root filesystem", stage=_STAGE)
    if not is_ext4(image, part):
        raise _corrupt(image, part, "there is no ext4 superblock there")
    for _ in range(_MAX_LINKS):
        out = _debugfs(image, part, "stat", path)
        if out is None:
            return None
        kind = _TYPE.search(out)
        if kind is None:
            raise _corrupt(image, part, f"debugfs could not stat {path}")
        if kind.group(1) == b"regular":
            return _debugfs(image, part, "cat", path)
        if kind.group(1) != b"symlink":
            raise InputError(f"{path} in {image} is a {kind.group(1).decode()}, not a file", stage=_STAGE)
        fast = _FAST_LINK.search(out)
        target = fast.group(1) if fast else _debugfs(image, part, "cat", path) or b""
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target.decode()))
    raise ProductError(f"{path} in {image}: more than {_MAX_LINKS} symlinks deep", stage=_STAGE)


def _debugfs(image: Path | str, part: Partition, command: str, path: str) -> bytes | None:
    proc = run(["debugfs", "-c", "-R", f'{command} "{path}"', f"{image}?offset={part.start}"],
               package="e2fsprogs", check=False)
    problems = [line for line in proc.stderr.splitlines() if line.strip() and not _BANNER.match(line)]
    if any(b"File not found by ext2_lookup" in line for line in problems):
        return None
    if proc.returncode or problems:
        raise _corrupt(image, part, f"debugfs {command} {path}: "
                       + " / ".join(p.decode(errors="replace") for p in problems))
    return proc.stdout


def _corrupt(image: Path | str, part: Partition, why: str) -> ProductError:
    return ProductError(f"ext4 partition {part.index} of {image} (at byte {part.start}): {why}. "
                        "Fix: rebuild or rewrite the image; its root filesystem is damaged or missing",
                        stage=_STAGE, image=str(image), partition=part.index)
