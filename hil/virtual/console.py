"""The virtual module's serial console: a pty the host opens as it opens a USB-serial adapter.

The module holds the pty's master; the slave (``/dev/pts/N``) is published under a fixed symlink, the
rig's ``console.device``, which stays valid across power cycles of the module, as an adapter's
``/dev/serial/by-id`` name does. Output leaves at the baud rate (10 bits a byte) times the speed-up and
never blocks the module: bytes that nobody reads are lost, as on a real UART.

Faults (``[virtual.console]`` in the rig file):

- ``unplug_after = SECONDS``: the adapter disappears that many host seconds after the console appears
  (the pty is closed and the symlink removed, so a reader gets pyserial's SerialException).
- ``garbage = true``: the two ends disagree on the baud rate, so every byte arrives mangled both ways.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import math
import os
import select
import threading
import time
import tty
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hil.errors import InfrastructureError, RigFileError
from hil.rig import Rig
from hil.runtime import private_dir
from hil.virtual.journal import Journal
from hil.virtual.timing import DeviceClock

STAGE = "virtual.console"
_CHUNK_SECONDS = 0.02  # output leaves in slices this long, so pacing costs few wake-ups
_IDLE_WAIT = 0.05  # how often to look again while nobody has the console open


@dataclass(frozen=True)
class ConsoleFaults:
    unplug_after: float | None = None  # host seconds after the console appears
    garbage: bool = False

    @classmethod
    def from_rig(cls, rig: Rig) -> ConsoleFaults:
        """The faults of ``[virtual.console]``, each key checked, so a typo is an error and not a no-op."""
        raw: Mapping[str, Any] = rig.virtual.console if rig.virtual else {}
        where = "virtual.console"
        unplug = raw.get("unplug_after")
        if unplug is not None and (isinstance(unplug, bool) or not isinstance(unplug, int | float)
                                   or not 0 <= unplug < math.inf):
            raise RigFileError(rig.path, f"{where}.unplug_after",
                               f"must be a number of seconds, not {unplug!r}",
                               "give the host seconds after which the adapter disappears, e.g. 2.5")
        garbage = raw.get("garbage", False)
        if not isinstance(garbage, bool):
            raise RigFileError(rig.path, f"{where}.garbage", f"must be true or false, not {garbage!r}",
                               "write garbage = true to mangle every byte (wrong baud rate)")
        for key in raw:
            if key not in ("unplug_after", "garbage"):
                near = difflib.get_close_matches(str(key), ["unplug_after", "garbage"], n=1)
                raise RigFileError(rig.path, f"{where}.{key}", "is not a known console fault",
                                   f"did you mean {near[0]!r}?" if near else
                                   "use unplug_after = SECONDS or garbage = true")
        return cls(None if unplug is None else float(unplug), garbage)


def mangle(data: bytes) -> bytes:
    """What a UART set to another baud rate makes of ``data``: framing garbage, never readable text."""
    return bytes(((b * 0x9D + 0x3B) & 0x7F) | 0x80 for b in data)


class VirtualConsole:
    def __init__(self, path: str | os.PathLike[str], baud: int, clock: DeviceClock, journal: Journal,
                 faults: ConsoleFaults | None = None):
        self.path = Path(path)
        self.baud = baud
        self.faults = faults or ConsoleFaults()
        self.pts = ""
        self._clock = clock
        self._journal = journal
        self._master = -1
        self._wake_r = self._wake_w = -1
        self._pending = bytearray()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._receiver: Callable[[bytes], None] | None = None
        self._threads: list[threading.Thread] = []
        self._unplug_timer: threading.Timer | None = None
        self._close_lock = threading.Lock()
        self.unplugged = False

    @classmethod
    def for_rig(cls, rig: Rig, clock: DeviceClock, journal: Journal) -> VirtualConsole:
        return cls(rig.console.device, rig.console.baud, clock, journal, ConsoleFaults.from_rig(rig))

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> VirtualConsole:
        """Create the pty and publish it at :attr:`path`."""
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # outlives this fd: the settings belong to the pty, not to the open file
            self.pts = os.ttyname(slave)
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self._master = master
        self._wake_r, self._wake_w = os.pipe()
        try:
            self._publish()
        except BaseException:
            self._release_fds()
            raise
        self._stop.clear()
        self._threads = [threading.Thread(target=self._pump, name=f"console-out {self.path}", daemon=True),
                         threading.Thread(target=self._listen, name=f"console-in {self.path}", daemon=True)]
        for t in self._threads:
            t.start()
        if self.faults.unplug_after is not None:
            self._unplug_timer = threading.Timer(self.faults.unplug_after, self.unplug)
            self._unplug_timer.daemon = True
            self._unplug_timer.start()
        self._journal.record("console", "appeared", path=str(self.path), pts=self.pts)
        return self

    def close(self) -> None:
        """Remove the console (idempotent)."""
        if self._unplug_timer is not None:
            self._unplug_timer.cancel()
        self._shut()

    def unplug(self) -> None:
        """The USB-serial adapter is pulled: the device node goes away under any reader."""
        self._shut(unplugging=True)

    def __enter__(self) -> VirtualConsole:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _publish(self) -> None:
        private_dir(self.path.parent)
        if self.path.exists() and not self.path.is_symlink():
            raise InfrastructureError(f"{self.path} exists and is not a console symlink, so the virtual "
                                      "console cannot be published there. Fix: remove it or set "
                                      "HIL_RUNTIME_DIR to another folder", stage=STAGE)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        temp.symlink_to(self.pts)
        os.replace(temp, self.path)  # atomic, and replaces a link a crashed run left behind

    def _shut(self, *, unplugging: bool = False) -> None:
        with self._close_lock:
            if self._master < 0:
                return
            if unplugging:  # said before the node goes: a reader that sees it vanish may look at once
                self.unplugged = True
                self._journal.record("fault", "console unplugged", path=str(self.path))
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            os.write(self._wake_w, b"x")
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(timeout=2.0)
            with contextlib.suppress(FileNotFoundError):
                if self.path.is_symlink() and os.readlink(self.path) == self.pts:
                    self.path.unlink()
            self._release_fds()
            self._journal.record("console", "removed", path=str(self.path))

    def _release_fds(self) -> None:
        for fd in (self._master, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._master = self._wake_r = self._wake_w = -1

    # -- the device side ---------------------------------------------------------------------------

    def on_receive(self, callback: Callable[[bytes], None] | None) -> None:
        """Deliver bytes the host sends to ``callback`` (called from the console's own thread)."""
        self._receiver = callback

    def write(self, data: str | bytes, *, baud: int | None = None) -> None:
        """Queue output; never blocks. Newlines become CR LF, as a tty with ONLCR sends them.

        ``baud``: the rate the module transmits at; if it is not the console's, the host reads garbage.
        """
        raw = data.replace("\n", "\r\n").encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        if self.faults.garbage or (baud is not None and baud != self.baud):
            raw = mangle(raw)
        with self._cond:
            if self._stop.is_set():
                return
            self._pending += raw
            self._cond.notify()

    def discard(self) -> None:
        """Drop output not yet sent (the module lost power): the line on the wire stops where it is."""
        with self._cond:
            self._pending.clear()

    def drained(self) -> bool:
        with self._cond:
            return not self._pending

    def _pump(self) -> None:
        rate = self.baud / 10 * self._clock.speedup  # bytes per second
        chunk = max(1, int(rate * _CHUNK_SECONDS))
        poller = select.poll()
        poller.register(self._master, select.POLLOUT)
        due = time.monotonic()
        while True:
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                data = bytes(self._pending[:chunk])
                del self._pending[:chunk]
            self._send(poller, data)
            due = max(due, time.monotonic()) + len(data) / rate
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return

    def _send(self, poller: select.poll, data: bytes) -> None:
        events = dict(poller.poll(0)).get(self._master, 0)
        if events & select.POLLHUP:
            return  # nobody has the port open: the bytes fall on the floor
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._master, data)  # a partial write drops the rest, like an overrun FIFO

    def _listen(self) -> None:
        poller = select.poll()
        poller.register(self._master, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll())
            if self._stop.is_set():
                return
            flags = events.get(self._master, 0)
            if flags & select.POLLIN:
                try:
                    data = os.read(self._master, 4096)
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.EAGAIN):
                        raise
                    data = b""
                if data:
                    self._deliver(mangle(data) if self.faults.garbage else data)
                    continue
            if flags & select.POLLHUP:
                self._stop.wait(_IDLE_WAIT)  # no reader attached: poll() would report the hang-up at once

    def _deliver(self, data: bytes) -> None:
        receiver = self._receiver
        if receiver is not None:
            receiver(data)
