"""Decompressed images, kept by the SHA-256 of the compressed file so a re-flash skips decoding.

An entry is the image as a sparse file holding only its mapped ranges, plus a JSON note of the image
size and those ranges, so the next flash is a plain copy of known ranges. The key of a file is
remembered by (path, size, mtime, inode), so a second flash does not even re-hash the compressed
file, and it is the SHA-256 ``hil flash`` prints: one hash serves both. The cache is bounded: least
recently used entries go first. Entries appear atomically (rename), so a decode that fails part-way never
leaves one behind.

One decode, many writers: the flash that decodes an image holds ``<key>.lock`` (flock) while it fills
``.<key>.tmp``; a flash of the same image that starts meanwhile (several rigs, one controller) does not decode
again but follows that file (:class:`Follower`) as its bytes appear. The decoder writes in ascending order, so
every byte below the file's size is final and its holes are unmapped ranges.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from hil.errors import InfrastructureError
from hil.filehash import sha256_file
from hil.flash.ranges import Extent

DEFAULT_MAX_BYTES = 16 * 1024**3
_KEYS = "keys.json"


def default_root() -> Path:
    return Path(os.environ.get("HIL_CACHE_DIR") or Path.home() / ".cache" / "cm-hil" / "images")


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path  # the decompressed image (sparse: unmapped ranges are holes)
    image_size: int
    ranges: list[Extent]


class CacheWriter:
    """Collects one image's mapped bytes while it is flashed; :meth:`commit` makes it an entry. Made by
    :meth:`ImageCache.claim` with the entry's lock held, so it is the only writer of its temporary file."""

    def __init__(self, cache: ImageCache, key: str, lock: int):
        self.cache, self.key, self._lock = cache, key, lock
        self._tmp = cache.root / f".{key}.tmp"
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()  # a crashed decode's leftover: followers that opened it move to the entry
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)

    def write(self, offset: int, data: memoryview) -> None:
        os.pwrite(self._fd, data, offset)

    def commit(self, image_size: int, ranges: list[Extent]) -> CacheEntry:
        os.ftruncate(self._fd, image_size)
        os.close(self._fd)
        self._fd = -1
        image = self.cache.root / f"{self.key}.img"
        os.replace(self._tmp, image)
        note = self.cache.root / f"{self.key}.json"
        note.write_text(json.dumps({"image_size": image_size, "ranges": ranges}))
        self._release()
        self.cache.trim()
        return CacheEntry(self.key, image, image_size, ranges)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
        self._release()

    def _release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # followers see the decode is over
            self._lock = -1


class Follower:
    """Reads an entry that another flash is still decoding into, as its bytes appear."""

    POLL = 0.02

    def __init__(self, cache: ImageCache, key: str, fd: int, lock: int):
        self.cache, self.key, self.fd, self._lock = cache, key, fd, lock
        self.entry: CacheEntry | None = None  # once the decode is over

    def available(self, want: int) -> int:
        """Bytes of the image final so far, waiting until at least ``want`` exist or the decode is over."""
        while True:
            size = os.fstat(self.fd).st_size
            if size >= want or self.done():
                return size if self.entry is None else self.entry.image_size
            time.sleep(self.POLL)

    def done(self) -> bool:
        """True once the decoding flash has committed the entry (reads then come from it); an error if it gave up."""
        if self.entry is not None:
            return True
        try:
            fcntl.flock(self._lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        entry = self.cache.lookup(self.key)
        if entry is None:
            raise InfrastructureError(f"the flash decoding image {self.key[:12]} into the cache stopped before the "
                                      "end, and this flash was following it. Fix: look at that flash's error, then "
                                      "retry", stage="flash.write")
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)  # the same bytes; a leftover's inode may differ
        os.close(self.fd)
        self.fd, self.entry = fd, entry
        return True

    def data(self, start: int, end: int) -> list[Extent]:
        """The written (mapped) ranges within [start, end) of what is final so far."""
        if self.entry is not None:
            return [(max(s, start), min(e, end)) for s, e in self.entry.ranges if s < end and e > start]
        out: list[Extent] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= end:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            out.append((data, hole))
            pos = hole
        return out

    def close(self) -> None:
        for fd in (self.fd, self._lock):
            with contextlib.suppress(OSError):
                os.close(fd)


class ImageCache:
    def __init__(self, root: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root) if root else default_root()
        self.max_bytes = max_bytes
        self._hashing: dict[str, Future[str]] = {}  # file identity -> its hash, done or under way in this process
        self._mutex = threading.Lock()

    def key(self, path: Path) -> str:
        """SHA-256 of the file's content; remembered by path, size, mtime and inode. A file is hashed once per
        process even when several threads ask at once (``hil flash`` hashes in the background for its summary
        while the module boots; the writer's own call then waits for that hash instead of making a second)."""
        st = path.stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        with self._mutex:
            hashing = self._hashing.get(ident)
            mine = hashing is None
            if hashing is None:
                hashing = self._hashing[ident] = Future()
        if not mine:
            return hashing.result()
        try:
            digest = self._keys().get(ident) or self._remember(ident, sha256_file(path))
        except BaseException as e:
            with self._mutex:
                del self._hashing[ident]  # the next call tries again
            hashing.set_exception(e)
            raise
        hashing.set_result(digest)
        return digest

    def _remember(self, ident: str, digest: str) -> str:
        keys = self._keys()
        keys[ident] = digest
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{_KEYS}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(keys))
        os.replace(tmp, self.root / _KEYS)
        return digest

    def lookup(self, key: str) -> CacheEntry | None:
        note, image = self.root / f"{key}.json", self.root / f"{key}.img"
        try:
            data = json.loads(note.read_text())
            if image.stat().st_size != data["image_size"]:
                return None
        except (OSError, ValueError, KeyError):
            return None
        os.utime(note)  # least recently used goes first
        return CacheEntry(key, image, int(data["image_size"]), [(int(s), int(e)) for s, e in data["ranges"]])

    def claim(self, key: str, mapped_bytes: int | None = None) -> CacheWriter | Follower | None:
        """A writer for a new entry (this flash decodes), a follower of the flash already decoding it, or None when
        the image could never fit the cache."""
        if mapped_bytes is not None and mapped_bytes > self.max_bytes:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            try:
                return CacheWriter(self, key, lock)
            except BaseException:
                os.close(lock)
                raise
        for _ in range(250):  # the decoder has the lock: its file appears at once
            try:
                return Follower(self, key, os.open(self.root / f".{key}.tmp", os.O_RDONLY | os.O_NOFOLLOW), lock)
            except FileNotFoundError:
                if self.lookup(key) is not None:  # done already: the caller reads the entry
                    os.close(lock)
                    return None
                time.sleep(0.02)
        os.close(lock)
        raise InfrastructureError(f"another flash holds the cache lock of image {key[:12]} but writes no file "
                                  f"in {self.root}. Fix: end that flash, or pass --no-cache", stage="flash.write")

    def trim(self) -> None:
        """Drop least recently used entries until the cache holds at most ``max_bytes``."""
        entries = []
        for note in self.root.glob("*.json"):  # a followed entry's inode stays readable when trimmed
            if note.name == _KEYS:
                continue
            image = note.with_suffix(".img")
            try:
                entries.append((note.stat().st_mtime, note, image, image.stat().st_blocks * 512))
            except FileNotFoundError:
                note.unlink(missing_ok=True)
        used = sum(e[3] for e in entries)
        for _, note, image, size in sorted(entries, key=lambda e: e[0]):
            if used <= self.max_bytes:
                break
            image.unlink(missing_ok=True)
            note.unlink(missing_ok=True)
            used -= size

    def _keys(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / _KEYS).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
