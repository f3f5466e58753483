"""SHA-256 of a file as ``sha256sum`` prints it: the identity a person compares (a download page's hash,
``hil flash --expect-sha256``), not the fast checksum verification uses (hil/flash/digest.py)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Digest of a sparse file: holes are hashed from a zero buffer instead of being read."""
    h, zeros, buf = hashlib.sha256(), memoryview(bytes(4 * 1024**2)), memoryview(bytearray(4 * 1024**2))
    with open(path, "rb", buffering=0) as f:
        fd, pos, end = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole up to the end
                data = end
            for at in range(pos, data, len(zeros)):
                h.update(zeros[:min(len(zeros), data - at)])
            hole = end if data == end else os.lseek(fd, data, os.SEEK_HOLE)
            os.lseek(fd, data, os.SEEK_SET)
            while data < hole:
                n = f.readinto(buf[:min(len(buf), hole - data)]) or 0
                if not n:
                    raise OSError(f"{path} shrank while it was being hashed")
                h.update(buf[:n])
                data += n
            pos = hole
    return h.hexdigest()


class Sha256InBackground:
    """``hasher`` (:func:`sha256_file`, or an image cache's memoised key, which is the same SHA-256) in a daemon
    thread, for a summary printed after a long job: the job does not wait for it, and a failing or interrupted job
    leaves at once instead of waiting for the hash of a large file."""

    def __init__(self, path: Path, hasher: Callable[[Path], str] = sha256_file):
        self._digest: str | None = None
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(path, hasher), name="sha256", daemon=True)
        self._thread.start()

    def _run(self, path: Path, hasher: Callable[[Path], str]) -> None:
        try:
            self._digest = hasher(path)
        except OSError as e:
            self._error = e

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest
