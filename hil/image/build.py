"""Build Raspberry Pi OS-shaped test images without root and without mounting anything.

The image is a sparse file: an MBR written here, a FAT32 boot partition made by mkfs.fat at its offset
and filled by mtools, and an ext4 root made by ``mkfs.ext4 -d`` at its offset. Only what the filesystems
write is allocated, so a 256 MiB image takes a fraction of a second and a few MiB of disk.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import InputError
from hil.filehash import sha256_file
from hil.image import compress as packing
from hil.image.bootfs import boot_files, boot_partition
from hil.image.mbr import SECTOR, DiskLayout, Partition, encode, partuuid
from hil.image.tools import run
from hil.units import human_size

MiB = 1024**2
BOOT_START = 4 * MiB  # sector 8192, as on Raspberry Pi OS
ALIGN = 4 * MiB
MIN_BOOT = 33 * MiB  # FAT32 needs 65525 clusters; at 512-byte clusters that is just under 33 MiB
ROOT_BASE = 12 * MiB  # 4 MiB journal, metadata and the few files of an unfilled root
BROKEN = ("truncated", "corrupt", "oversize")
FILL_PATH = "var/lib/hil/fill.bin"
_STAGE = "image.build"
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)
_BUILD_ID = re.compile(r"^[A-Za-z0-9._:+-]{1,64}$")


@dataclass(frozen=True)
class ImageSpec:
    model: str = "cm4"
    size: int = 256 * MiB
    boot_size: int = 64 * MiB
    build_id: str | None = None  # None: a random one
    disk_id: int | None = None  # None: a random one
    hostname: str = "raspberrypi"
    uart: bool = True  # enable_uart=1 in config.txt
    config: tuple[str, ...] = ()  # extra config.txt lines, appended under [all]
    cmdline: tuple[str, ...] = ()  # extra kernel arguments
    fill: int = 0  # bytes of incompressible data in the root filesystem
    compress: tuple[str, ...] = ()  # any of compress.FORMATS
    bmap: bool = False
    #: "truncated" / "corrupt" break the compressed outputs if any were asked for, else the raw image;
    #: "oversize" makes the image larger than ``emmc_size``.
    broken: str | None = None
    emmc_size: int | None = None


@dataclass(frozen=True)
class BuiltImage:
    path: Path  # the raw image
    size: int  # of the raw image file, bytes
    build_id: str
    disk_id: int
    model: str
    layout: DiskLayout  # as built, before any deliberate breakage
    compressed: dict[str, Path] = field(default_factory=dict)  # format -> file
    bmap: Path | None = None
    broken: str | None = None

    @functools.cached_property
    def sha256(self) -> str:
        """Of the raw image file as written (a broken raw image's own digest), computed on first use:
        hashing an oversize image the size of a real eMMC takes seconds."""
        return sha256_file(self.path)

    @property
    def outputs(self) -> list[Path]:
        return [self.path, *self.compressed.values(), *([self.bmap] if self.bmap else [])]


def minimum_size(spec: ImageSpec) -> int:
    """The smallest image that holds the boot partition and a root filesystem with the fill data."""
    root = ROOT_BASE + spec.fill + spec.fill // 32  # inode tables, bitmaps, extent blocks
    return _align(_align(BOOT_START + spec.boot_size, ALIGN) + root, MiB)


def build_image(out: Path, spec: ImageSpec, *, extra_boot: Mapping[str, bytes | Path] | None = None,
                extra_root: Callable[[Path], None] | None = None) -> BuiltImage:
    """Write the image (and the outputs ``spec`` asks for) at ``out``; remove them all if that fails.

    For images with real contents (:mod:`hil.image.bootable`): ``extra_boot`` adds or replaces boot partition
    files (bytes, or a file to copy), and ``extra_root`` adds to the root tree before it becomes ext4."""
    out = Path(out)
    _validate(out, spec)
    build_id = spec.build_id or secrets.token_hex(6)
    disk_id = spec.disk_id if spec.disk_id is not None else secrets.randbits(32) or 1
    layout = _layout(spec, disk_id)
    written: list[Path] = [out]
    try:
        _write_raw(out, spec, layout, build_id, extra_boot or {}, extra_root)
        compressed: dict[str, Path] = {}
        if spec.broken in ("truncated", "corrupt") and not spec.compress:
            _break_raw(out, layout, spec.broken)
        if spec.compress:
            written += [packing.output_path(out, fmt) for fmt in spec.compress]
            compressed = packing.compress(out, spec.compress)
            for path in compressed.values():
                if spec.broken == "truncated":
                    packing.truncate_stream(path)
                elif spec.broken == "corrupt":
                    packing.corrupt_stream(path)
        bmap = None
        if spec.bmap:
            written.append(packing.output_path(out, "bmap"))
            bmap = packing.write_bmap(out)
        return BuiltImage(out, out.stat().st_size, build_id, disk_id, spec.model, layout,
                          compressed, bmap, spec.broken)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _validate(out: Path, spec: ImageSpec) -> None:
    def bad(message: str) -> InputError:
        return InputError(message, stage=_STAGE)

    boot_files(spec.model)  # raises for an unknown model
    if not out.parent.is_dir():
        raise bad(f"{out.parent} is not a directory. Fix: create it, or write the image elsewhere")
    if spec.boot_size < MIN_BOOT:
        raise bad(f"boot partition of {human_size(spec.boot_size)} is too small for FAT32; "
                  f"the minimum is {MIN_BOOT // MiB} MiB")
    if spec.size < minimum_size(spec):
        raise bad(f"image size {human_size(spec.size)} cannot hold the partitions: the minimum for a "
                  f"{spec.boot_size // MiB} MiB boot partition and {human_size(spec.fill)} of fill is "
                  f"{minimum_size(spec) // MiB} MiB. Fix: a larger size, or a smaller boot partition or fill")
    if spec.build_id is not None and not _BUILD_ID.match(spec.build_id):
        raise bad(f"build id {spec.build_id!r}: use 1-64 letters, digits and . _ : + -")
    if not _HOSTNAME.match(spec.hostname):
        raise bad(f"hostname {spec.hostname!r}: use letters, digits and inner hyphens, at most 63")
    if spec.disk_id is not None and not 0 < spec.disk_id < 2**32:
        raise bad(f"disk id {spec.disk_id:#x} is not a non-zero 32-bit number")
    if any("\n" in line for line in spec.config):
        raise bad("a config.txt line contains a newline; pass each line separately")
    if any(not arg or any(c.isspace() for c in arg) for arg in spec.cmdline):
        raise bad("a kernel argument is empty or contains white space; pass each argument separately")
    unknown = [fmt for fmt in spec.compress if fmt not in packing.FORMATS]
    if unknown:
        raise bad(f"unknown compression {', '.join(unknown)}; choose from {', '.join(packing.FORMATS)}")
    if spec.broken is not None and spec.broken not in BROKEN:
        raise bad(f"unknown broken variant {spec.broken!r}; choose one of {', '.join(BROKEN)}")
    if (spec.broken == "oversize") != (spec.emmc_size is not None):
        raise bad("an oversize image needs the eMMC size it must exceed, and only it takes one")


def _layout(spec: ImageSpec, disk_id: int) -> DiskLayout:
    size = spec.size
    if spec.broken == "oversize":
        assert spec.emmc_size is not None
        size = max(size, _align(spec.emmc_size + 1, ALIGN))
    boot = Partition(1, BOOT_START, spec.boot_size // MiB * MiB, 0x0C)
    root_start = _align(boot.end, ALIGN)
    return DiskLayout(disk_id, (boot, Partition(2, root_start, size // SECTOR * SECTOR - root_start, 0x83)))


def _write_raw(out: Path, spec: ImageSpec, layout: DiskLayout, build_id: str,
               extra_boot: Mapping[str, bytes | Path], extra_root: Callable[[Path], None] | None) -> None:
    boot, root = layout.partitions
    with open(out, "wb") as f:  # truncating first leaves a fully sparse file, even over an old image
        f.truncate(root.end)
        f.write(encode(layout))
    with tempfile.TemporaryDirectory(prefix=".hil-image-", dir=out.parent) as tmp:
        files = {**boot_partition(spec.model, disk_id=layout.disk_id, build_id=build_id, uart=spec.uart,
                                  config=spec.config, cmdline=spec.cmdline), **extra_boot}
        staged = Path(tmp, "boot")
        staged.mkdir()
        for name, data in files.items():
            if isinstance(data, Path):
                (staged / name).symlink_to(data.resolve())  # mcopy reads through the link
            else:
                (staged / name).write_bytes(data)
        first = boot.start // SECTOR  # --offset places it, -h records it as the hidden sectors
        cluster = _sectors_per_cluster(boot.size)
        run(["mkfs.fat", "-F", "32", "-n", "bootfs", "-S", str(SECTOR), "-s", str(cluster),
             f"--offset={first}", "-h", str(first), "-i", f"{layout.disk_id:08x}",
             out, str(boot.size // 1024)],
            package="dosfstools", stage=_STAGE)
        run(["mcopy", "-i", f"{out}@@{boot.start}", *sorted(staged.iterdir()), "::/"],
            package="mtools", stage=_STAGE)
        rootdir = Path(tmp, "root")
        _populate_root(rootdir, spec, layout.disk_id, build_id)
        if extra_root is not None:
            extra_root(rootdir)
        run(["mkfs.ext4", "-q", "-F", "-T", "default", "-b", "4096", "-J", "size=4", "-L", "rootfs",
             "-E", f"offset={root.start},nodiscard,lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
             "-d", rootdir, out, str(root.size // 4096)], package="e2fsprogs", stage=_STAGE)


def _populate_root(root: Path, spec: ImageSpec, disk_id: int, build_id: str) -> None:
    """A root filesystem with the files a test reads or a login needs: who it is, and a root login."""
    files = {
        "etc/build-id": f"{build_id}\n",
        "etc/hostname": f"{spec.hostname}\n",
        "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{spec.hostname}\n",
        "usr/lib/os-release": (
            'PRETTY_NAME="Raspberry Pi OS (hil test image) 12 (bookworm)"\n'
            'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\n'
            f"ID=debian\nHIL_BUILD_ID={build_id}\nHIL_MODEL={spec.model}\n"),
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "etc/shadow": "root::19700:0:99999:7:::\n",  # empty password: root logs in without one
        "etc/issue": f"Raspberry Pi OS (hil test image {build_id}) \\n \\l\n\n",
        "etc/fstab": (f"PARTUUID={partuuid(disk_id, 1)}  /boot/firmware  vfat  defaults          0  2\n"
                      f"PARTUUID={partuuid(disk_id, 2)}  /               ext4  defaults,noatime  0  1\n"),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")  # as on Debian
    for folder in ("boot/firmware", "root", "tmp"):
        (root / folder).mkdir(parents=True)
    if spec.fill:
        (root / FILL_PATH).parent.mkdir(parents=True)
        with open(root / FILL_PATH, "wb") as f:
            for done in range(0, spec.fill, 4 * MiB):
                f.write(os.urandom(min(4 * MiB, spec.fill - done)))


def _break_raw(out: Path, layout: DiskLayout, how: str) -> None:
    root = layout.partitions[1]
    with open(out, "r+b") as f:
        if how == "truncated":
            f.truncate(root.start + root.size // 2 // SECTOR * SECTOR)
        else:  # garbage over the four entries, keeping the 0x55AA signature; entry 1's status is invalid
            f.seek(446)
            f.write(b"\x5a" + os.urandom(63))


def _sectors_per_cluster(size: int) -> int:
    """Cluster size as Microsoft's FAT32 table picks it: 512 bytes up to 260 MiB, then 4 KiB and up."""
    for limit, sectors in ((260 * MiB, 1), (8 * 1024 * MiB, 8), (16 * 1024 * MiB, 16), (32 * 1024 * MiB, 32)):
        if size <= limit:
            return sectors
    return 64


def _align(n: int, to: int) -> int:
    return -(-n // to) * to
