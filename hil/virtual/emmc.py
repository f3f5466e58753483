"""The virtual module's eMMC: a sparse image file, exposed as a slow, faulty block device.

The image file is the module's own view of its eMMC (the SoC reading it); it keeps its content between
runs, as a real eMMC does. What the host sees once the module is in mass-storage mode is
:attr:`VirtualEmmc.block_device`: as root, a loop device over a FUSE file served by
:mod:`hil.virtual.throttlefs` in its own process, which paces I/O at the configured rate and answers EIO
where faults are injected; otherwise the image file itself, without speed model or faults.

Everything spawned here runs without umockdev's LD_PRELOAD, which would redirect ``/dev`` and ``/sys``
for losetup, fusermount and libfuse into the test bed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import hil.rig
from hil.errors import InfrastructureError
from hil.hostenv import outside_umockdev
from hil.runtime import open_private, private_dir
from hil.virtual.journal import Journal
from hil.virtual.throttlefs import CONTROL_NAME, IMAGE_NAME, MAX_WRITE, OPS, Fault, State, encode_state

STAGE = "virtual.emmc"
_TOOLS = ("losetup", "fusermount", "findmnt")


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, env=outside_umockdev(), capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"{' '.join(cmd)} did not finish in 30 s", stage=STAGE) from None


class _FuseLoop:
    """A throttlefs server over the image plus a loop device over its file, and their teardown.

    Its working directory depends only on the image path, so a run that crashed leaves its loop device
    and mount where the next run finds and removes them; a lock keeps two live runs apart.
    """

    def __init__(self, image: Path):
        key = hashlib.sha1(str(image.resolve()).encode()).hexdigest()[:16]
        self.workdir = hil.rig.runtime_dir() / "emmc" / key
        self.mountpoint = self.workdir / "mnt"
        self.served_file = self.mountpoint / IMAGE_NAME
        self.image = image
        self.loop = ""
        self._lock: IO[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._server: subprocess.Popen[bytes] | None = None

    def start(self, size: int, state: State) -> str:
        """Serve the image and return the loop device; on failure everything made so far is undone."""
        try:
            self._start(size, state)
        except BaseException:
            self.stop()
            raise
        return self.loop

    def _start(self, size: int, state: State) -> None:
        if not os.path.exists("/dev/fuse"):
            raise InfrastructureError("/dev/fuse does not exist, so the eMMC cannot be a loop device. "
                                      "Fix: load the fuse module (modprobe fuse) or set "
                                      "[virtual.emmc] loop_device = false", stage=STAGE)
        missing = [t for t in _TOOLS if shutil.which(t) is None]
        if missing:
            raise InfrastructureError(f"{', '.join(missing)} not found. Fix: install util-linux and fuse3, "
                                      "or set [virtual.emmc] loop_device = false", stage=STAGE)
        private_dir(self.workdir, base=hil.rig.runtime_dir())
        self._lock = os.fdopen(open_private(self.workdir / "lock", os.O_WRONLY | os.O_CREAT), "wb")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise InfrastructureError(f"the eMMC image {self.image} is served by another running virtual "
                                      "rig. Fix: stop that run or give this rig its own state_dir",
                                      stage=STAGE) from None
        self._remove_leftovers()
        self.mountpoint.mkdir(exist_ok=True)
        self._log = os.fdopen(open_private(self.workdir / "server.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")
        self._server = subprocess.Popen(
            [sys.executable, "-m", "hil.virtual.throttlefs", str(self.image), str(self.mountpoint),
             "--parent", str(os.getpid())],
            env=outside_umockdev(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self._await_mount(size)
        self.send(state)
        result = _run("losetup", "--find", "--show", str(self.served_file))
        if result.returncode:
            raise InfrastructureError(f"losetup could not attach {self.served_file}: "
                                      f"{result.stderr.strip()}. Fix: free a loop device (losetup -a) or "
                                      "load the loop module", stage=STAGE)
        self.loop = result.stdout.strip()

    def _await_mount(self, size: int) -> None:
        assert self._server is not None
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                raise InfrastructureError(f"the eMMC FUSE server exited with status "
                                          f"{self._server.returncode}: {self._log_tail()}", stage=STAGE)
            try:
                if os.stat(self.served_file).st_size == size:
                    return
            except OSError:
                pass
            time.sleep(0.01)
        raise InfrastructureError(f"the eMMC FUSE server did not mount {self.mountpoint} in 10 s: "
                                  f"{self._log_tail()}", stage=STAGE)

    def _log_tail(self) -> str:
        try:
            text = (self.workdir / "server.log").read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-2000:] or "(no output)"

    def send(self, state: State) -> None:
        """Put rates and faults in force; returns once the server applies them."""
        payload = encode_state(state)
        if len(payload) > MAX_WRITE:
            raise ValueError(f"too many injected faults ({len(state.faults)}) for one control message")
        try:
            fd = os.open(self.mountpoint / CONTROL_NAME, os.O_WRONLY)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
        except OSError as e:
            raise InfrastructureError(f"the eMMC FUSE server at {self.mountpoint} did not take new rates or "
                                      f"faults: {e}", stage=STAGE) from None

    def _loops_over_file(self) -> list[str]:
        result = _run("losetup", "--list", "--json", "--output", "NAME,BACK-FILE")
        if result.returncode or not result.stdout.strip():
            return []
        devices = json.loads(result.stdout).get("loopdevices", [])
        target = str(self.served_file)
        return [d["name"] for d in devices if (d.get("back-file") or "").removesuffix(" (deleted)") == target]

    def _mounted(self) -> bool:
        return _run("findmnt", "--noheadings", "--mountpoint", str(self.mountpoint)).returncode == 0

    def _unmount(self) -> None:
        for _ in range(20):  # the loop device lets go of the file shortly after losetup -d
            if _run("fusermount", "-u", str(self.mountpoint)).returncode == 0 or not self._mounted():
                return
            time.sleep(0.1)
        _run("fusermount", "-u", "-z", str(self.mountpoint))

    def _remove_leftovers(self) -> None:
        """Detach loop devices and unmount what a crashed run left over this image's FUSE file."""
        for device in self._loops_over_file():
            _run("losetup", "--detach", device)
        if self._mounted():
            self._unmount()

    def stop(self) -> None:
        if self.loop:
            _run("losetup", "--detach", self.loop)
            self.loop = ""
        if self._server is not None:
            self._unmount()
            try:
                self._server.wait(5)
            except subprocess.TimeoutExpired:
                self._server.terminate()
                try:
                    self._server.wait(5)
                except subprocess.TimeoutExpired:
                    self._server.kill()
                    self._server.wait()
            self._server = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._lock.close()
            self._lock = None
            with contextlib.suppress(OSError):
                self.workdir.parent.rmdir()  # only when no other eMMC is served


class VirtualEmmc:
    """The eMMC of one virtual module; a context manager that sets up and tears down its block device."""

    def __init__(self, path: Path, size: int, config: hil.rig.VirtualEmmc, journal: Journal | None = None):
        if size <= 0 or size % 512:
            raise ValueError(f"eMMC size {size} is not a positive multiple of 512 bytes")
        self.image_path = Path(path)
        self.size = size
        self._config = config
        self._journal = journal
        self._state = State(config.write_bps, config.read_bps,
                            tuple(Fault(f.offset, f.length, f.op) for f in config.io_errors))
        self._mutex = threading.Lock()
        self._fuse: _FuseLoop | None = None
        self._open = False
        self.block_device = str(self.image_path)

    @property
    def modelled(self) -> bool:
        """Whether :attr:`block_device` applies the speed model and faults (as root, with a loop device)."""
        return self._fuse is not None

    def open(self) -> VirtualEmmc:
        if self._open:
            return self
        self.image_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.image_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)  # new files stay sparse
        finally:
            os.close(fd)
        if self._config.loop_device and os.geteuid() == 0:
            fuse = _FuseLoop(self.image_path)
            with self._mutex:
                self.block_device = fuse.start(self.size, self._state)
                self._fuse = fuse
        self._open = True
        self._record("attached", device=self.block_device, modelled=self.modelled,
                     write_bps=self._state.write_bps, read_bps=self._state.read_bps)
        return self

    def close(self) -> None:
        if not self._open:
            return
        with self._mutex:
            if self._fuse is not None:
                self._fuse.stop()
                self._fuse = None
            self.block_device = str(self.image_path)
            self._open = False
        self._record("detached")

    def __enter__(self) -> VirtualEmmc:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        """What the module itself reads from its eMMC: no speed model, no injected faults."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} is outside the {self.size}-byte eMMC")
        with open(self.image_path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def inject_error(self, offset: int, length: int, op: str) -> None:
        """Make I/O touching ``[offset, offset + length)`` fail with EIO; ``op`` is read, write or both."""
        if op not in OPS:
            raise ValueError(f"fault op {op!r} is not one of {', '.join(OPS)}")
        if offset < 0 or length <= 0:
            raise ValueError(f"fault range {offset}+{length} is empty or negative")
        fault = Fault(offset, length, op)
        self._update(faults=(*self._state.faults, fault))
        self._record("fault injected", offset=offset, length=length, op=op)

    def clear_errors(self) -> None:
        self._update(faults=())
        self._record("faults cleared")

    def set_rates(self, write_bps: float, read_bps: float) -> None:
        """Change the speed model (bytes per second, 0 = unlimited) for the I/O that follows."""
        if write_bps < 0 or read_bps < 0:
            raise ValueError(f"rates must not be negative (write {write_bps}, read {read_bps})")
        self._update(write_bps=float(write_bps), read_bps=float(read_bps))
        self._record("rates", write_bps=write_bps, read_bps=read_bps)

    def _update(self, *, write_bps: float | None = None, read_bps: float | None = None,
                faults: tuple[Fault, ...] | None = None) -> None:
        with self._mutex:
            s = self._state
            state = State(s.write_bps if write_bps is None else write_bps,
                          s.read_bps if read_bps is None else read_bps,
                          s.faults if faults is None else faults)
            if self._fuse is not None:
                self._fuse.send(state)
            self._state = state

    def _record(self, what: str, **details: object) -> None:
        if self._journal is not None:
            self._journal.record("emmc", what, image=str(self.image_path), **details)
