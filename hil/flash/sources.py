"""Image files to flash: raw, .xz, .gz, .zst or .bz2, recognised by their magic bytes, checked up front.

Everything that can be known before a byte is written is checked here: the decompressed size against
the eMMC (xz's index, zstd's frame headers, gzip's ISIZE, a raw file's length, the .bmap's ImageSize),
a truncated container (xz's index and zstd's block headers are walked by their own tools), and, when
the compressed file is small enough for it to be cheap, a full integrity pass that also yields the
exact size. Decoding uses the compressors' own tools in a child process, so it runs on other cores
than the writer (``xz -T0`` decodes the independent blocks of a threaded .xz in parallel).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hil.errors import InputError, ProductError
from hil.flash.ranges import Bmap, FixedRanges, read_bmap
from hil.image import gpt
from hil.image.mbr import SECTOR, layout_of
from hil.image.tools import need, run, tool_env
from hil.units import human_size

STAGE = "flash.source"
MAGIC = {"xz": b"\xfd7zXZ\x00", "zst": b"\x28\xb5\x2f\xfd", "gz": b"\x1f\x8b", "bz2": b"BZh"}
DECODERS: dict[str, tuple[tuple[str, ...], str]] = {
    "xz": (("xz", "-T0", "-dc"), "xz-utils"),
    "gz": (("gzip", "-dc"), "gzip"),
    "zst": (("zstd", "-dcq"), "zstd"),
    "bz2": (("bzip2", "-dc"), "bzip2"),
}
#: Compressed files up to this size get a full test decode before writing (it costs well under a second
#: or two, and it turns a corrupt image into a refusal instead of a half-written disk).
TEST_PASS_LIMIT = 64 * 1024**2
_ZSTD_SIZE = re.compile(rb"Decompressed Size:.*\((\d+) B\)")


@dataclass(frozen=True)
class Image:
    path: Path
    format: str  # "raw" or a key of DECODERS
    file_size: int
    size: int | None  # bytes once decompressed, when known before decoding
    bmap: Bmap | None

    @property
    def compressed(self) -> bool:
        return self.format != "raw"


def detect(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((fmt for fmt, magic in MAGIC.items() if head.startswith(magic)), "raw")


def regular_file(path: Path, what: str) -> int:
    """The size of ``path``, refused at once (InputError) unless it is a regular file: reading a FIFO or a
    socket waits forever, a character device never ends."""
    try:
        st = path.stat()
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read: {e.strerror}. Fix: check the path", stage=STAGE) from None
    if not stat.S_ISREG(st.st_mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}.get(stat.S_IFMT(st.st_mode), "not a file")
        raise InputError(f"{what} {path} is {kind}, not a regular file; nothing was written. Fix: give the "
                         "path of an image file", stage=STAGE, image=str(path))
    return st.st_size


def open_image(path: Path | str, capacity: int, *, bmap: Path | None = None,
               test_limit: int = TEST_PASS_LIMIT, raw: bool = False) -> Image:
    """Look at ``path`` and refuse it (InputError) if it cannot fit ``capacity`` bytes or is broken.

    Unless ``raw``, the image must start with a valid MBR or GPT whose partitions fit it (random data or a
    program renamed .img is refused before a byte is written). ``bmap`` defaults to a companion file:
    ``x.img.bmap`` for ``x.img``, ``x.img.xz`` and the like."""
    path = Path(path)
    file_size = regular_file(path, "image")
    try:
        fmt = detect(path)
    except OSError as e:
        raise InputError(f"image {path} cannot be read: {e.strerror}. Fix: check the path", stage=STAGE) from None
    size: int | None
    if fmt == "raw":
        size = file_size
    elif fmt == "xz":
        size = _xz_size(path)
    elif fmt == "zst":
        size = _zstd_size(path)
    elif fmt == "gz":
        size = _gzip_size(path, file_size)
    else:
        size = None
    if fmt != "raw" and file_size <= test_limit:
        size = _test_pass(path, fmt)
    bmap_path = bmap or _companion_bmap(path)
    parsed = read_bmap(bmap_path) if bmap_path is not None else None
    if parsed is not None and size is not None and parsed.image_size != size:
        raise InputError(f"{parsed.path} describes a {parsed.image_size}-byte image but {path} holds {size} bytes. "
                         "Fix: use the .bmap made for this image, or remove it", stage=STAGE)
    known = size if size is not None else parsed.image_size if parsed else None
    if known is not None and known > capacity:
        raise InputError(f"image {path} is {human_size(known)} ({known} bytes), larger than the "
                         f"{human_size(capacity)} eMMC ({capacity} bytes). Fix: use an image built for this "
                         "eMMC size (or shrink its root partition)", stage=STAGE, image_size=known,
                         capacity=capacity)
    if size is not None and size == 0:
        raise InputError(f"image {path} is empty. Fix: check the file", stage=STAGE)
    image = Image(path, fmt, file_size, known, parsed)
    if not raw:
        check_partition_table(image)
    return image


def _not_a_disk_image(path: Path, why: str) -> InputError:
    return InputError(f"image {path} is not a disk image ({why}); nothing was written. Fix: use a disk image "
                      "(it starts with an MBR or GPT partition table), or pass --raw to write raw data on purpose",
                      stage=STAGE, image=str(path))


def check_partition_table(image: Image) -> None:
    """A valid MBR with partitions, or a protective MBR and a valid GPT, all inside the image; and, with a
    .bmap, the table and each partition's first block among its mapped ranges (else the .bmap belongs to
    another image). InputError otherwise."""
    data = head(image, 64 * 1024)
    try:
        layout = layout_of(data, image.size, "it")
    except ProductError as e:
        why = e.message.split(". Fix:")[0]
        if data[510:512] == b"\x55\xaa":  # it means to be a disk image: a broken one
            raise _broken(image.path, why) from None
        raise _not_a_disk_image(image.path, why) from None
    if not layout.partitions:
        raise _not_a_disk_image(image.path, "its MBR lists no partitions")
    starts = [p.start for p in layout.partitions]
    if any(p.type_id == gpt.PROTECTIVE_TYPE for p in layout.partitions):
        need = gpt.entries_end(data)
        if len(data) < need <= gpt.MAX_ENTRIES_BYTES + 64 * 1024:
            data = head(image, need)
        try:
            table = gpt.read_gpt(data, image.size, "it")
        except ProductError as e:
            raise _broken(image.path, e.message) from None
        starts = [p.start for p in table.partitions]
    if image.bmap is not None:
        mapped = FixedRanges(image.bmap.ranges)
        for what, at in (("the partition table", 0), *((f"the partition at byte {s}", s) for s in starts)):
            if not mapped.mapped(at, at + SECTOR):
                raise InputError(f"{image.bmap.path} does not map {what} of {image.path}: the .bmap was made for "
                                 "another image; nothing was written. Fix: use the image's own .bmap, or remove "
                                 "it", stage=STAGE, bmap=str(image.bmap.path))


def _companion_bmap(path: Path) -> Path | None:
    stem = path.with_suffix("") if path.suffix.lstrip(".") in DECODERS else path
    for candidate in (stem.with_name(stem.name + ".bmap"), path.with_name(path.name + ".bmap")):
        if candidate.is_file():
            return candidate
    return None


def _broken(path: Path, why: str) -> InputError:
    return InputError(f"image {path} is corrupt or truncated ({why}); nothing was written. "
                      "Fix: download or copy the image again", stage=STAGE, image=str(path))


def _xz_size(path: Path) -> int:
    proc = run(["xz", "--robot", "--list", path], package="xz-utils", check=False, stage=STAGE)
    if proc.returncode:
        raise _broken(path, proc.stderr.decode(errors="replace").strip())
    for line in proc.stdout.decode().splitlines():
        fields = line.split("\t")
        if fields[0] == "totals":
            return int(fields[4])
    raise _broken(path, "xz --list printed no totals")


def _zstd_size(path: Path) -> int | None:
    proc = run(["zstd", "-lv", path], package="zstd", check=False, stage=STAGE)
    if proc.returncode:
        raise _broken(path, proc.stderr.decode(errors="replace").strip().splitlines()[-1])
    match = _ZSTD_SIZE.search(proc.stdout)
    return int(match.group(1)) if match else None


def _gzip_size(path: Path, file_size: int) -> int | None:
    """ISIZE (the last four bytes) is the size modulo 4 GiB: exact for one member below 4 GiB."""
    if file_size < 18:
        raise _broken(path, f"only {file_size} bytes, shorter than a gzip header and trailer")
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    return isize if file_size < 2**32 // 1032 else None  # deflate cannot expand more than 1032:1


def _test_pass(path: Path, fmt: str) -> int:
    """Decode the whole file, counting bytes: proves it intact and gives its exact size."""
    total = 0
    with DecodedStream(Image(path, fmt, 0, None, None)) as stream:
        buf = bytearray(1024 * 1024)
        while n := stream.readinto(buf):
            total += n
        try:
            stream.finish()
        except ProductError as e:
            raise _broken(path, e.evidence.get("decoder", e.message)) from None
    return total


class DecodedStream:
    """The decompressed bytes of an image from its decoder's stdout; :meth:`finish` checks the exit."""

    def __init__(self, image: Image):
        argv, package = DECODERS[image.format]
        self.image = image
        self._stderr = b""
        self._proc = subprocess.Popen([need(argv[0], package), *argv[1:], str(image.path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=tool_env(),
                                      bufsize=0)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._out = self._proc.stdout
        self._fd = self._out.fileno()
        self._err_reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_reader.start()

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        self._stderr = self._proc.stderr.read()

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` as far as the stream goes; short only at the end."""
        view = memoryview(buf)
        got = 0
        while got < len(view):
            n = os.readv(self._fd, [view[got:]])
            if not n:
                break
            got += n
        return got

    def finish(self) -> None:
        """Raise ProductError "image corrupt" if the decoder failed (call after the last read)."""
        code = self._proc.wait()
        self._err_reader.join()
        if code:
            lines = [line.strip() for line in self._stderr.decode(errors="replace").splitlines() if line.strip()]
            why = lines[0] if lines else f"exit status {code}"
            raise ProductError(f"image corrupt: {self.image.path} failed to decompress part-way ({why})",
                               stage=STAGE, decoder=why, image=str(self.image.path))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._out.close()
        self._err_reader.join()

    def __enter__(self) -> DecodedStream:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def head(image: Image, n: int) -> bytes:
    """The first ``n`` decompressed bytes (fewer if the image is shorter), for a look before flashing."""
    if not image.compressed:
        with open(image.path, "rb") as f:
            return f.read(n)
    with DecodedStream(image) as stream:
        buf = bytearray(n)
        got = stream.readinto(buf)
    return bytes(buf[:got])
