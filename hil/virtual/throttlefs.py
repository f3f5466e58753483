"""A FUSE file system that serves one eMMC image at a modelled speed and fails where faults are injected.

The kernel has no device mapper, nbd or ublk here, but a loop device accepts a file on a FUSE mount as
its backing file; so a slow, faulty eMMC is a loop device over the file this server exposes. It runs as
its own process (``python -m hil.virtual.throttlefs IMAGE MOUNTPOINT``, as root) so the pacing never shares a GIL
with whoever writes to the disk.

It speaks the kernel's FUSE protocol on ``/dev/fuse`` itself (:class:`EmmcServer`) instead of through libfuse 2:
on a controller with several rigs its CPU competes with theirs, and libfuse 2 cannot take requests above 128 KiB,
so every MiB cost eight trips through Python. Requests of 1 MiB and no copy outside the kernel halve it.

The mount holds two files: ``emmc`` (the image) and ``control``. Writing a JSON state
(:func:`encode_state`) to ``control`` replaces rates and faults; the write returns only once the state is
in force, so a change made at run time affects the very next I/O.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

IMAGE_NAME = "emmc"
CONTROL_NAME = "control"
OPS = ("read", "write", "both")
MAX_WRITE = 1024 * 1024  # largest single FUSE request (the kernel's limit: 256 pages); also the largest control message

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


# FUSE requests this server answers (linux/fuse.h); any other gets ENOSYS, FORGET and INTERRUPT no reply at all
LOOKUP, FORGET, GETATTR, SETATTR, OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 1, 2, 3, 4, 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, INTERRUPT, DESTROY, BATCH_FORGET = 25, 26, 27, 28, 29, 36, 38, 42
_NO_REPLY = (FORGET, INTERRUPT, BATCH_FORGET)
_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_IO_IN = struct.Struct("<QQIIQII")  # fuse_read_in / fuse_write_in: fh, offset, size, flags, lock_owner, ...
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # fuse_init_out (64 bytes)
_ROOT, _IMAGE, _CONTROL = 1, 2, 3  # node ids (FUSE_ROOT_ID is 1)
_NODES = {IMAGE_NAME: _IMAGE, CONTROL_NAME: _CONTROL}
_KERNEL_MINOR = 38  # the protocol minor this server speaks (Debian 12's linux/fuse.h); older kernels say theirs
_BIG_WRITES, _MAX_PAGES, _DIRECT_IO, _FATTR_SIZE = 1 << 5, 1 << 22, 1 << 0, 1 << 3
_VALID = 3600  # seconds the kernel may keep names and attributes: they never change while mounted


class EmmcServer:
    """Answers the kernel's FUSE requests on ``/dev/fuse`` itself, without libfuse: one thread, one request at a
    time (a device has one queue), requests of up to :data:`MAX_WRITE` bytes (libfuse 2 caps them at 128 KiB,
    eight times the Python per request), each a read of the request, one ``pwrite`` or ``preadv`` on the image
    and one reply, with no copies in between."""

    def __init__(self, image: str, device: int, state: State):
        self._fd = os.open(image, os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        self._dev = device
        self._state = state
        self._clock = BusyClock()
        self._t0 = time.time_ns()
        self._request = mmap.mmap(-1, MAX_WRITE + 64 * 1024)  # a WRITE's headers and data, whole
        self._reply = mmap.mmap(-1, _OUT_HEADER.size + MAX_WRITE)  # a READ's header, then its data
        self._handlers: dict[int, Callable[[int, memoryview], bytes | int]] = {
            INIT: self._init, LOOKUP: self._lookup, GETATTR: self._getattr, SETATTR: self._setattr,
            OPEN: self._open, OPENDIR: self._open, READ: self._read, WRITE: self._write, STATFS: self._statfs,
            READDIR: self._readdir, FSYNC: self._fsync, FLUSH: _nothing, RELEASE: _nothing, RELEASEDIR: _nothing,
            DESTROY: _nothing,
        }

    def serve(self) -> None:
        """Until the file system is unmounted."""
        view = memoryview(self._request)
        try:
            while True:
                try:
                    got = os.readv(self._dev, [self._request])
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):  # a request interrupted meanwhile
                        continue
                    if e.errno == errno.ENODEV:  # unmounted
                        return
                    raise
                _, opcode, unique, node, *_ = _IN_HEADER.unpack_from(self._request)
                if opcode in _NO_REPLY:
                    continue
                handler = self._handlers.get(opcode)
                try:
                    if handler is None:
                        raise FuseError(errno.ENOSYS)
                    with view[_IN_HEADER.size:got] as body:
                        answer = handler(node, body)
                except FuseError as e:
                    self._send(_OUT_HEADER.pack(_OUT_HEADER.size, -e.errno, unique))
                    continue
                if isinstance(answer, int):  # a READ: its data already lies in the reply buffer
                    _OUT_HEADER.pack_into(self._reply, 0, _OUT_HEADER.size + answer, 0, unique)
                    with memoryview(self._reply)[:_OUT_HEADER.size + answer] as out:
                        self._send(out)
                else:
                    self._send(_OUT_HEADER.pack(_OUT_HEADER.size + len(answer), 0, unique) + answer)
        finally:
            view.release()
            os.fsync(self._fd)
            os.close(self._fd)

    def _send(self, reply: bytes | memoryview) -> None:
        try:
            os.write(self._dev, reply)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted and is gone
                raise

    def _init(self, node: int, body: memoryview) -> bytes:
        major, minor, readahead, _ = struct.unpack_from("<IIII", body)
        if major != 7:
            raise FuseError(errno.EPROTO)
        return _INIT_OUT.pack(7, min(minor, _KERNEL_MINOR), readahead, _BIG_WRITES | _MAX_PAGES, 16, 12, MAX_WRITE, 1,
                              MAX_WRITE // mmap.PAGESIZE, 0, 0)

    def _attr(self, node: int) -> bytes:
        if node == _ROOT:
            mode, size, nlink = stat.S_IFDIR | 0o700, 0, 2
        elif node in (_IMAGE, _CONTROL):
            mode, size, nlink = stat.S_IFREG | 0o600, self._size if node == _IMAGE else 0, 1
        else:
            raise FuseError(errno.ENOENT)
        sec, nsec = divmod(self._t0, 10**9)
        return _ATTR.pack(node, size, -(-size // 512), sec, sec, sec, nsec, nsec, nsec, mode, nlink, os.getuid(),
                          os.getgid(), 0, 4096, 0)

    def _lookup(self, node: int, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0].decode(errors="replace")
        if node != _ROOT or name not in _NODES:
            raise FuseError(errno.ENOENT)
        found = _NODES[name]
        return struct.pack("<QQQQII", found, 0, _VALID, _VALID, 0, 0) + self._attr(found)

    def _getattr(self, node: int, body: memoryview) -> bytes:
        return struct.pack("<QII", _VALID, 0, 0) + self._attr(node)

    def _setattr(self, node: int, body: memoryview) -> bytes:
        valid, _, _, size = struct.unpack_from("<IIQQ", body)
        if node == _IMAGE and valid & _FATTR_SIZE and size != self._size:
            raise FuseError(errno.EPERM)  # an eMMC has the size it has
        return self._getattr(node, body)

    def _open(self, node: int, body: memoryview) -> bytes:
        if node == _ROOT:
            return struct.pack("<QII", 0, 0, 0)
        self._attr(node)
        return struct.pack("<QII", 0, _DIRECT_IO, 0)  # every read and write reaches the model, none the page cache

    def _readdir(self, node: int, body: memoryview) -> bytes:
        if node != _ROOT:
            raise FuseError(errno.ENOTDIR)
        _, offset, size, *_ = _IO_IN.unpack_from(body)
        out = b""
        entries = [(".", _ROOT, stat.S_IFDIR), ("..", _ROOT, stat.S_IFDIR), (IMAGE_NAME, _IMAGE, stat.S_IFREG),
                   (CONTROL_NAME, _CONTROL, stat.S_IFREG)]
        for index, (name, ino, kind) in enumerate(entries[offset:], start=offset + 1):
            raw = name.encode()
            entry = struct.pack("<QQII", ino, index, len(raw), kind >> 12) + raw
            entry += bytes(-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return out

    def _statfs(self, node: int, body: memoryview) -> bytes:
        return struct.pack("<QQQQQIIII24x", self._size // 4096, 0, 0, 0, 0, 4096, 255, 4096, 0)

    def _fsync(self, node: int, body: memoryview) -> bytes:
        os.fdatasync(self._fd)
        return b""

    def _pace(self, op: str, offset: int, length: int, bps: float) -> float:
        if any(f.hits(op, offset, length) for f in self._state.faults):
            raise FuseError(errno.EIO)
        return self._clock.reserve(length, bps)

    @staticmethod
    def _wait(until: float) -> None:
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _read(self, node: int, body: memoryview) -> int:
        _, offset, size, *_ = _IO_IN.unpack_from(body)
        if node != _IMAGE:
            return 0
        size = max(0, min(size, self._size - offset, MAX_WRITE))
        done = self._pace("read", offset, size, self._state.read_bps)
        with memoryview(self._reply)[_OUT_HEADER.size:_OUT_HEADER.size + size] as data:
            got = os.preadv(self._fd, [data], offset) if size else 0
        self._wait(done)
        return got

    def _write(self, node: int, body: memoryview) -> bytes:
        _, offset, size, *_ = _IO_IN.unpack_from(body)
        with body[_IO_IN.size:_IO_IN.size + size] as data:
            if node == _CONTROL:
                try:
                    self._state = decode_state(bytes(data))
                except ValueError:
                    raise FuseError(errno.EINVAL) from None
                return struct.pack("<II", size, 0)
            if node != _IMAGE:
                raise FuseError(errno.EBADF)
            if offset + size > self._size:
                raise FuseError(errno.ENOSPC)
            done = self._pace("write", offset, size, self._state.write_bps)
            written = os.pwrite(self._fd, data, offset)
        self._wait(done)
        return struct.pack("<II", written, 0)


class FuseError(Exception):
    def __init__(self, code: int):
        super().__init__(os.strerror(code))
        self.errno = code


def _nothing(node: int, body: memoryview) -> bytes:
    return b""


def mount(mountpoint: str) -> int:
    """Mount an empty FUSE file system of this server's at ``mountpoint`` (as root) and return its ``/dev/fuse``
    descriptor; nothing answers until :meth:`EmmcServer.serve` runs."""
    device = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={device},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},max_read={MAX_WRITE}"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"cm-hil-emmc", mountpoint.encode(), b"fuse.throttlefs", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV),
                  options.encode()) != 0:
        code = ctypes.get_errno()
        os.close(device)
        raise OSError(code, f"mounting the eMMC at {mountpoint}: {os.strerror(code)}")
    return device


_MS_NOSUID, _MS_NODEV = 2, 4


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
    device = mount(args.mountpoint)
    EmmcServer(args.image, device, State(0.0, 0.0)).serve()  # unlimited until the first control message

if __name__ == "__main__":
    main()
