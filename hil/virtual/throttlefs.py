"""A FUSE file system that serves one eMMC image at a modelled speed and fails where faults are injected.

The kernel has no device mapper, nbd or ublk here, but a loop device accepts a file on a FUSE mount as
its backing file; so a slow, faulty eMMC is a loop device over the file this server exposes. It runs as
its own process (``python -m hil.virtual.throttlefs IMAGE MOUNTPOINT``) so the pacing never shares a GIL
with whoever writes to the disk.

The mount holds two files: ``emmc`` (the image) and ``control``. Writing a JSON state
(:func:`encode_state`) to ``control`` replaces rates and faults; the write returns only once the state is
in force, so a change made at run time affects the very next I/O.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from fuse import FUSE, FuseOSError, Operations

IMAGE_NAME = "emmc"
CONTROL_NAME = "control"
OPS = ("read", "write", "both")
MAX_WRITE = 1024 * 1024  # largest single FUSE request; also the largest control message

#: Idle time the clock forgives between back-to-back requests. Without it each request's round trip
#: through the kernel and back is lost time, and a writer measures 10-15 % less than the model's rate.
SLACK = 0.025


@dataclass(frozen=True)
class Fault:
    offset: int
    length: int
    op: str  # "read", "write" or "both"

    def hits(self, op: str, offset: int, length: int) -> bool:
        overlaps = offset < self.offset + self.length and self.offset < offset + length
        return overlaps and self.op in (op, "both")


@dataclass(frozen=True)
class State:
    write_bps: float  # 0 = unlimited
    read_bps: float
    faults: tuple[Fault, ...] = ()


def encode_state(state: State) -> bytes:
    faults = [[f.offset, f.length, f.op] for f in state.faults]
    return json.dumps({"write_bps": state.write_bps, "read_bps": state.read_bps, "faults": faults}).encode()


def decode_state(data: bytes) -> State:
    """Parse a control message; ValueError when it is not a valid state."""
    try:
        raw = json.loads(data)
        faults = tuple(Fault(int(o), int(n), str(op)) for o, n, op in raw["faults"])
        state = State(float(raw["write_bps"]), float(raw["read_bps"]), faults)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad control message: {e}") from None
    if state.write_bps < 0 or state.read_bps < 0 or any(f.op not in OPS for f in faults):
        raise ValueError("bad control message: negative rate or unknown fault op")
    return state


class BusyClock:
    """One device, one queue: each request waits for the ones before it, then takes ``length / rate``."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy_until = 0.0

    def reserve(self, length: int, bps: float) -> float:
        """Book the device for ``length`` bytes; returns the monotonic time at which the request is done."""
        now = time.monotonic()
        if not bps:
            return now
        with self._mutex:
            start = max(self._busy_until, now - SLACK)
            self._busy_until = start + length / bps
            return self._busy_until


class ThrottleFs(Operations):
    """Serve ``image`` as ``/emmc``. Attribute names must not clash with FUSE operations (``lock``...)."""

    use_ns = True

    def __init__(self, image: str, state: State):
        self._fd = os.open(image, os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        self._state = state
        self._clock = BusyClock()
        self._t0 = time.time_ns()

    def _entry(self, path: str) -> str:
        name = path.lstrip("/")
        if name not in ("", IMAGE_NAME, CONTROL_NAME):
            raise FuseOSError(errno.ENOENT)
        return name

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        name = self._entry(path)
        if name == "":
            mode, size, nlink = stat.S_IFDIR | 0o700, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o600, self._size if name == IMAGE_NAME else 0, 1
        return {"st_mode": mode, "st_size": size, "st_nlink": nlink, "st_uid": os.getuid(),
                "st_gid": os.getgid(), "st_atime": self._t0, "st_mtime": self._t0, "st_ctime": self._t0}

    def readdir(self, path: str, fh: int) -> Iterable[str]:
        if self._entry(path) != "":
            raise FuseOSError(errno.ENOTDIR)
        return [".", "..", IMAGE_NAME, CONTROL_NAME]

    def open(self, path: str, flags: int) -> int:
        if self._entry(path) == "":
            raise FuseOSError(errno.EISDIR)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        name = self._entry(path)
        if name == IMAGE_NAME and length != self._size:
            raise FuseOSError(errno.EPERM)  # an eMMC has the size it has

    def _pace(self, op: str, offset: int, length: int, bps: float) -> float:
        state = self._state
        if any(f.hits(op, offset, length) for f in state.faults):
            raise FuseOSError(errno.EIO)
        return self._clock.reserve(length, bps)

    @staticmethod
    def _wait(until: float) -> None:
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if self._entry(path) != IMAGE_NAME:
            return b""
        size = max(0, min(size, self._size - offset))
        done = self._pace("read", offset, size, self._state.read_bps)
        data = os.pread(self._fd, size, offset)
        self._wait(done)
        return data

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if self._entry(path) == CONTROL_NAME:
            try:
                self._state = decode_state(data)
            except ValueError as e:
                raise FuseOSError(errno.EINVAL) from e
            return len(data)
        if offset + len(data) > self._size:
            raise FuseOSError(errno.ENOSPC)
        done = self._pace("write", offset, len(data), self._state.write_bps)
        written = os.pwrite(self._fd, data, offset)
        self._wait(done)
        return written

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        os.fdatasync(self._fd)

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": self._size // 4096, "f_namemax": 255}

    def destroy(self, path: str) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


def _end_with(parent: int, mountpoint: str) -> None:
    """The process that started this server attached a loop device over its file and stops both when it closes
    the eMMC. Killed (SIGKILL), it stops nothing, and with no later run over the same image nobody would: once
    it is gone, let go of the loop device and the mount until FUSE() returns (it may not have mounted yet when
    the parent died early)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    served = os.path.join(mountpoint, IMAGE_NAME)
    while True:
        listed = subprocess.run(["losetup", "--associated", served], capture_output=True, text=True, check=False)
        for line in listed.stdout.splitlines():
            subprocess.run(["losetup", "--detach", line.split(":", 1)[0]], capture_output=True, check=False)
        subprocess.run(["fusermount", "-u", "-z", mountpoint], capture_output=True, check=False)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="the eMMC image file to serve")
    parser.add_argument("mountpoint")
    parser.add_argument("--parent", type=int, default=os.getppid(),
                        help="the pid whose end ends this server (default: the parent, if it still runs)")
    args = parser.parse_args(argv)
    threading.Thread(target=_end_with, args=(args.parent, args.mountpoint), name="end-with-parent",
                     daemon=True).start()
    fs = ThrottleFs(args.image, State(0.0, 0.0))  # unlimited until the first control message
    FUSE(fs, args.mountpoint, foreground=True, direct_io=True, big_writes=True, max_write=MAX_WRITE,
         fsname="cm-hil-emmc", subtype="throttlefs")


if __name__ == "__main__":
    main()
