"""Decompressed images, kept by the SHA-256 of the compressed file so a re-flash skips decoding.

An entry is the image as a sparse file holding only its mapped ranges, plus a JSON note of the image
size and those ranges, so the next flash is a plain copy of known ranges. The key of a file is
remembered by (path, size, mtime, inode), so a second flash does not even re-hash the compressed
file. The cache is bounded: least recently used entries go first. Entries appear atomically (rename),
so a decode that fails part-way never leaves one behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    """Collects one image's mapped bytes while it is flashed; :meth:`commit` makes it an entry."""

    def __init__(self, cache: ImageCache, key: str):
        self.cache, self.key = cache, key
        self._tmp = cache.root / f".{key}.{os.getpid()}.tmp"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

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
        self.cache.trim()
        return CacheEntry(self.key, image, image_size, ranges)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class ImageCache:
    def __init__(self, root: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root) if root else default_root()
        self.max_bytes = max_bytes

    def key(self, path: Path) -> str:
        """SHA-256 of the file's content; remembered by path, size, mtime and inode."""
        st = path.stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        keys = self._keys()
        if ident in keys:
            return keys[ident]
        digest = sha256_file(path)
        keys[ident] = digest
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{_KEYS}.{os.getpid()}"
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

    def writer(self, key: str, mapped_bytes: int | None = None) -> CacheWriter | None:
        """A writer for a new entry, or None when the image could never fit the cache."""
        if mapped_bytes is not None and mapped_bytes > self.max_bytes:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        return CacheWriter(self, key)

    def trim(self) -> None:
        """Drop least recently used entries until the cache holds at most ``max_bytes``."""
        entries = []
        for note in self.root.glob("*.json"):
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
