"""Write an image's mapped ranges to a disk: large aligned O_DIRECT writes, overlapped with decoding.

Three things run at once: the decoder (a child process, see :mod:`hil.flash.sources`), this thread
(reading the decoded stream or the raw file into page-aligned 4 MiB buffers, planning, hashing what
will be written and copying it into the image cache) and a writer thread doing ``pwritev`` with
``O_DIRECT``. The system calls release the GIL, so the threads really overlap. The checksums of what was
written (:mod:`hil.flash.digest`) are the reference for :mod:`hil.flash.verify`.

The first MiB (partition table, boot sector) is zeroed before anything else is written and gets its
image bytes last, after everything else is on the disk and synced: a flash cut short at any point (Ctrl-C,
power, a crash) leaves a disk with no partition table, which no module boots. If the image turns out bad
after writing began (a decode error, a .bmap checksum, more data than the disk holds), the first MiB is
zeroed again and the error says so.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import HilError, InputError, ProductError
from hil.flash.cache import CacheWriter, Follower, ImageCache
from hil.flash.checksums import StreamChecksums
from hil.flash.digest import piece_digest
from hil.flash.ranges import AllocationMap, Extent, FixedRanges, Plan, merge, sparse_ranges, total
from hil.flash.sources import DecodedStream, Image
from hil.units import human_size

STAGE = "flash.write"
CHUNK = 4 * 1024**2
HEAD = 1024**2  # written last: an MBR or GPT and the boot sector lie in it
BUFFERS = 6
SECTOR = 512
#: progress(position in the image, image size if known, bytes written so far, bytes the plan maps if known up
#: front (a .bmap, a sparse file, the cache; not while decoding by filesystems), seconds since start)
Progress = Callable[[int, int | None, int, int | None, float], None]


@dataclass(frozen=True)
class Written:
    start: int
    end: int
    digest: bytes  # hil.flash.digest.piece_digest of the bytes written there


@dataclass
class WriteResult:
    device: str
    image: Path
    image_size: int
    plan: str  # where the mapped ranges came from: bmap, sparse, filesystems, cache
    written: list[Written] = field(default_factory=list)
    seconds: float = 0.0
    from_cache: bool = False

    @property
    def bytes_written(self) -> int:
        return sum(w.end - w.start for w in self.written)

    @property
    def mbps(self) -> float:
        return self.bytes_written / self.seconds / 1e6 if self.seconds else 0.0


def open_direct(path: str, flags: int) -> int:
    """Open with O_DIRECT where the file system allows it (a tmpfs cache file does not)."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return os.open(path, flags)


class _DiskWriter(threading.Thread):
    """Takes (buffer, offset, ranges) jobs and writes them; the first error stops it."""

    def __init__(self, fd: int, buffers: list[mmap.mmap], free: queue.Queue[int]):
        super().__init__(name="flash-writer", daemon=True)
        self.fd, self.buffers, self.free = fd, buffers, free
        self.jobs: queue.Queue[tuple[int, int, list[Extent]] | None] = queue.Queue()
        self.error: tuple[int, OSError] | None = None

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            index, base, ranges = job
            if self.error is None:
                view = memoryview(self.buffers[index])
                for start, end in ranges:
                    length = -(-(end - start) // SECTOR) * SECTOR  # the image's last sector, padded
                    try:
                        done = os.pwritev(self.fd, [view[start - base:start - base + length]], start)
                        if done != length:
                            raise OSError(errno.EIO, f"short write ({done} of {length} bytes)")
                    except OSError as e:
                        self.error = (start, e)
                        break
                view.release()
            self.free.put(index)


def _plan_for(image: Image, entry_ranges: list[Extent] | None) -> tuple[Plan, str, int | None]:
    """The plan and its name, and the mapped byte count when known up front."""
    if entry_ranges is not None:
        return FixedRanges(entry_ranges), "cache", total(entry_ranges)
    if image.bmap is not None:
        return FixedRanges(image.bmap.ranges), "bmap", image.bmap.mapped_bytes
    if not image.compressed:
        holes = sparse_ranges(image.path)
        if holes is not None:
            return FixedRanges(holes), "sparse", total(holes)
    return AllocationMap(image.size), "filesystems", None


class _Tail(threading.Thread):
    """Decodes the rest of a stream that holds nothing more to write: the image is proven intact while
    the caller already reads back what was written (the device, not the decoder, is then busy)."""

    def __init__(self, stream: DecodedStream):
        super().__init__(name="flash-decode-tail", daemon=True)
        self.stream = stream
        self.error: BaseException | None = None

    def run(self) -> None:
        scratch = bytearray(CHUNK)
        try:
            while self.stream.readinto(scratch):
                pass
            self.stream.finish()
        except BaseException as e:  # handed to the caller's thread in finish()
            self.error = e
        finally:
            self.stream.close()


def write_image(image: Image, fd: int, device: str, capacity: int, *, cache: ImageCache | None = None,
                progress: Progress | None = None,
                then: Callable[[WriteResult], object] | None = None) -> WriteResult:
    """Write ``image`` through ``fd`` (the guarded disk, opened O_RDWR|O_DIRECT) and fsync it.

    ``then`` (typically the read-back) runs once every mapped byte is on the disk, while the decoder may
    still be checking the unmapped rest of the stream; a late decode error still fails the flash."""
    key = cache.key(image.path) if cache is not None and image.compressed else None
    entry = cache.lookup(key) if cache is not None and key is not None else None
    claim = None
    if cache is not None and key is not None and entry is None:
        claim = cache.claim(key, image.bmap.mapped_bytes if image.bmap is not None else None)
        entry = cache.lookup(key) if claim is None else None  # finished by another flash meanwhile
    plan, plan_name, mapped = _plan_for(image, entry.ranges if entry else None)
    source_path = entry.path if entry else image.path
    size = entry.image_size if entry else image.size
    cache_writer = claim if isinstance(claim, CacheWriter) else None
    follower = claim if isinstance(claim, Follower) else None
    if follower is not None:
        plan_name = "shared decode"  # another flash decodes this image into the cache: no decoder here
    result = WriteResult(device, image.path, size or 0, plan_name, from_cache=entry is not None or bool(follower))
    buffers = [mmap.mmap(-1, CHUNK) for _ in range(BUFFERS)]
    free: queue.Queue[int] = queue.Queue()
    for i in range(BUFFERS):
        free.put(i)
    disk = _DiskWriter(fd, buffers, free)
    first = _Head(fd)
    checks = (StreamChecksums(image.bmap) if entry is None and image.bmap is not None and image.bmap.checksums
              else None)
    disk.start()
    started = time.monotonic()
    tails: list[_Tail] = []
    try:
        if follower is not None:
            checks = None
            chunks = _following(follower, image, buffers, free)
        elif entry or not image.compressed:
            chunks = _random_access(source_path, size or 0, plan, buffers, free)
        else:
            chunks = _decoded(image, plan, buffers, free, tails)
        with contextlib.closing(chunks):
            position = _feed(chunks, image, capacity, buffers, disk, result, cache_writer, progress, started,
                             first, checks, mapped)
        disk.jobs.put(None)
        disk.join()
        try:
            if disk.error is not None:
                raise disk.error[1]
            if checks is not None:
                checks.finish()
            os.fsync(fd)
            first.write()
        except OSError as e:
            at = disk.error[0] if disk.error is not None else 0
            raise ProductError(f"the eMMC on {device} failed a write at byte {at} ({e.strerror or e}). Fix: "
                               "retry once; if it fails again at the same place the eMMC is worn or faulty",
                               stage=STAGE, offset=at, errno=e.errno) from None
        result.seconds = time.monotonic() - started
        if follower is not None and follower.entry is not None:
            size = follower.entry.image_size
        result.image_size = size if size is not None else position
        try:
            if then is not None:
                then(result)
        except BaseException:
            for tail in tails:
                tail.stream.close()  # the flash failed anyway: stop decoding
                tail.join()
            raise
        for tail in tails:
            tail.join()
            if tail.error is not None:
                raise tail.error
    except BaseException as e:
        if disk.is_alive():
            disk.jobs.put(None)
            disk.join()
        if cache_writer is not None:
            cache_writer.abort()
        if result.written and isinstance(e, HilError | OSError):  # the disk was touched
            raise _mark_unbootable(fd, device, e) from e
        raise
    finally:
        for b in buffers:
            b.close()
        first.close()
        if follower is not None:
            follower.close()
    if cache_writer is not None:
        cache_writer.commit(result.image_size, merge((w.start, w.end) for w in result.written))
    return result


class _Head:
    """The image's first MiB, held back in memory until the rest is on the disk (see the module's doc)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = mmap.mmap(-1, HEAD)  # page-aligned, for O_DIRECT
        self.ranges: list[Extent] = []
        self.zeroed = False

    def zero_first(self) -> None:
        """Before the first byte of the image: the disk's old table goes, so a cut-short flash is unbootable."""
        if not self.zeroed:
            with mmap.mmap(-1, HEAD) as zeros:
                os.pwritev(self.fd, [zeros], 0)
            os.fsync(self.fd)
            self.zeroed = True

    def hold(self, base: int, view: memoryview, ranges: list[Extent]) -> list[Extent]:
        """Keep the pieces of ``ranges`` below :data:`HEAD`; the rest, to be written now."""
        now = []
        for start, end in ranges:
            if start < HEAD:
                stop = min(end, HEAD)
                self.buffer[start:stop] = view[start - base:stop - base]
                self.ranges.append((start, stop))
                start = stop
            if start < end:
                now.append((start, end))
        return now

    def write(self) -> None:
        """Last: the held pieces, then a sync."""
        view = memoryview(self.buffer)
        try:
            for start, end in self.ranges:
                length = -(-(end - start) // SECTOR) * SECTOR
                done = os.pwritev(self.fd, [view[start:start + length]], start)
                if done != length:
                    raise OSError(errno.EIO, f"short write ({done} of {length} bytes)")
        finally:
            view.release()
        os.fsync(self.fd)

    def close(self) -> None:
        self.buffer.close()


def _feed(chunks: Iterator[tuple[int, int, int, list[Extent]]], image: Image, capacity: int,
          buffers: list[mmap.mmap], disk: _DiskWriter, result: WriteResult, cache_writer: CacheWriter | None,
          progress: Progress | None, started: float, first: _Head, checks: StreamChecksums | None,
          mapped: int | None) -> int:
    """Check, hash (and cache) each chunk's mapped pieces, hold back what lies in the first MiB and hand the
    rest to the writer; the end position."""
    position = 0
    for index, base, length, ranges in chunks:
        if disk.error is not None:
            break
        end = base + length
        if end > capacity:
            raise InputError(f"image {image.path} holds more than the {human_size(capacity)} disk "
                             f"({end} bytes and counting). Fix: use an image built for this eMMC size",
                             stage=STAGE)
        view = memoryview(buffers[index])
        try:
            if checks is not None:
                with view[:length] as part:  # released even when the check raises
                    checks.feed(base, part)
            for start, stop in ranges:
                piece = view[start - base:stop - base]
                result.written.append(Written(start, stop, piece_digest(piece)))
                if cache_writer is not None:
                    cache_writer.write(start, piece)
                piece.release()
            first.zero_first()
            now = first.hold(base, view, ranges)
        finally:
            view.release()
        disk.jobs.put((index, base, now))
        position = end
        if progress is not None:
            progress(position, result.image_size or None, result.bytes_written, mapped, time.monotonic() - started)
    return position


def _following(follower: Follower, image: Image, buffers: list[mmap.mmap],
               free: queue.Queue[int]) -> Generator[tuple[int, int, int, list[Extent]], None, None]:
    """Read what another flash's decode has made final so far, chunk by chunk, waiting for the rest."""
    base = 0
    while True:
        if follower.entry is not None and base >= follower.entry.image_size:
            return
        available = follower.available(base + CHUNK)
        end = min(base + CHUNK, available)
        if end <= base:
            return
        if follower.entry is None:
            end = base + (end - base) // mmap.PAGESIZE * mmap.PAGESIZE  # O_DIRECT: whole pages until the end
        wanted = follower.data(base, end)
        if wanted:
            index = free.get()
            view = memoryview(buffers[index])
            for start, stop in wanted:
                length = -(-(stop - start) // SECTOR) * SECTOR
                got = os.preadv(follower.fd, [view[start - base:start - base + length]], start)
                if got < stop - start:
                    raise InputError(f"the cached decode of {image.path} is shorter than it said (byte {start})",
                                     stage=STAGE)
                view[start - base + got:start - base + length] = bytes(length - got)
            view.release()
            yield index, base, end - base, wanted
        base = end


def _random_access(path: Path, size: int, plan: Plan, buffers: list[mmap.mmap],
                   free: queue.Queue[int]) -> Generator[tuple[int, int, int, list[Extent]], None, None]:
    """Read only what the plan maps, chunk by chunk (a raw image or a cache entry)."""
    fd = open_direct(str(path), os.O_RDONLY)
    try:
        for base in range(0, size, CHUNK):
            end = min(base + CHUNK, size)
            wanted = plan.mapped(base, end)
            if not wanted:
                continue
            index = free.get()
            view = memoryview(buffers[index])
            for start, stop in wanted:
                length = -(-(stop - start) // SECTOR) * SECTOR
                got = os.preadv(fd, [view[start - base:start - base + length]], start)
                if got < stop - start:
                    raise InputError(f"image {path} shrank while being written (short read at byte {start})",
                                     stage=STAGE)
                view[start - base + got:start - base + length] = bytes(length - got)
                plan.learn(start, view[start - base:stop - base])
            view.release()
            read = FixedRanges(wanted)
            yield index, base, end - base, [r for s, e in plan.mapped(base, end) for r in read.mapped(s, e)]
    finally:
        os.close(fd)


def _decoded(image: Image, plan: Plan, buffers: list[mmap.mmap], free: queue.Queue[int],
             tails: list[_Tail]) -> Generator[tuple[int, int, int, list[Extent]], None, None]:
    """Every byte of the decoded stream passes by; the plan learns from it and picks what to write. Once
    the plan maps nothing in the rest of the image, a :class:`_Tail` takes over the stream."""
    stream = DecodedStream(image)
    handed_over = False
    try:
        base = 0
        while True:
            index = free.get()
            view = memoryview(buffers[index])
            got = stream.readinto(view)
            if got < CHUNK:
                view[got:] = bytes(CHUNK - got)
            if got:
                plan.learn(base, view[:got])
            view.release()
            if not got:
                free.put(index)
                break
            ranges = plan.mapped(base, base + got)
            if ranges:
                yield index, base, got, ranges
            else:
                free.put(index)
            base += got
            if image.size is not None and base < image.size and not plan.mapped(base, image.size):
                tails.append(_Tail(stream))
                tails[-1].start()
                handed_over = True
                return
        stream.finish()
    finally:
        if not handed_over:
            stream.close()


def _mark_unbootable(fd: int, device: str, cause: BaseException) -> HilError:
    """Zero the first 1 MiB (partition table, boot sector of an MBR disk) and say so in the error."""
    zeros = mmap.mmap(-1, 1024**2)
    try:
        os.pwritev(fd, [zeros], 0)
        os.fsync(fd)
        note = f"{device} was marked unbootable (its first MiB zeroed): flash it again with a good image"
    except OSError as e:
        note = f"{device} could NOT be marked unbootable ({e.strerror}): it holds a partial image"
    finally:
        zeros.close()
    message = getattr(cause, "message", str(cause))
    kind = type(cause) if isinstance(cause, HilError) else ProductError
    error = kind(f"{message}; {note}", stage=getattr(cause, "stage", STAGE) or STAGE,
                 **getattr(cause, "evidence", {}))
    error.evidence["unbootable"] = True
    return error
