"""Read the written ranges back from the disk with O_DIRECT (never from the page cache) and compare
their checksums (:mod:`hil.flash.digest`) with the writer's; a reader thread and the hashing overlap."""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hil.errors import ProductError
from hil.flash.digest import piece_digest
from hil.flash.writer import CHUNK, SECTOR, Written

STAGE = "flash.verify"
_DEPTH = 4
#: progress(bytes verified, bytes to verify, seconds since start)
VerifyProgress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class VerifyResult:
    bytes_read: int
    seconds: float

    @property
    def mbps(self) -> float:
        return self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0


def _pieces(written: list[Written]) -> Iterator[Written]:
    """The writer hashed at most CHUNK bytes per piece, so pieces fit one buffer."""
    for w in written:
        if w.end - w.start > CHUNK:
            raise ValueError(f"written piece {w.start}-{w.end} is larger than a {CHUNK}-byte buffer")
        yield w


def verify_written(fd: int, device: str, written: list[Written], *,
                   progress: VerifyProgress | None = None) -> VerifyResult:
    """Raise ProductError naming the first range that differs or cannot be read."""
    buffers = [mmap.mmap(-1, CHUNK) for _ in range(_DEPTH)]
    free: queue.Queue[int] = queue.Queue()
    for i in range(_DEPTH):
        free.put(i)
    done: queue.Queue[tuple[int, Written] | OSError | None] = queue.Queue()
    stop = threading.Event()

    def reader() -> None:
        try:
            for piece in _pieces(written):
                index = free.get()
                if stop.is_set():
                    break
                length = -(-(piece.end - piece.start) // SECTOR) * SECTOR
                view = memoryview(buffers[index])
                try:
                    got = os.preadv(fd, [view[:length]], piece.start)
                finally:
                    view.release()
                if got < piece.end - piece.start:
                    raise OSError(0, f"short read ({got} bytes) at byte {piece.start}")
                done.put((index, piece))
        except OSError as e:
            done.put(e)
        else:
            done.put(None)

    thread = threading.Thread(target=reader, name="flash-verify", daemon=True)
    need = sum(w.end - w.start for w in written)
    started = time.monotonic()
    thread.start()
    checked = 0
    try:
        while (item := done.get()) is not None:
            if isinstance(item, OSError):
                raise ProductError(f"reading back {device} failed ({item.strerror or item}). Fix: retry; a "
                                   "repeated read error means the eMMC or the USB link is faulty", stage=STAGE)
            index, piece = item
            view = memoryview(buffers[index])
            digest = piece_digest(view[:piece.end - piece.start])
            view.release()
            free.put(index)
            if digest != piece.digest:
                raise ProductError(f"verification failed: {device} bytes {piece.start}-{piece.end} differ from "
                                   "what was written. Fix: flash again; if it recurs the eMMC is faulty",
                                   stage=STAGE, offset=piece.start, end=piece.end)
            checked += piece.end - piece.start
            if progress is not None:
                progress(checked, need, time.monotonic() - started)
    finally:
        stop.set()
        for _ in range(_DEPTH):
            free.put(0)
        thread.join()
        for b in buffers:
            b.close()
    return VerifyResult(checked, time.monotonic() - started)
