"""One uevent monitor per process, shared by everything that waits for USB devices and disks.

Why one, opened once and drained all the time by one thread: a monitor opened per wait misses what happens
between waits, and an unread socket fills up while the host is busy (a full one loses events). Under
umockdev 0.17.16 (Debian 12) it is also a matter of survival: its uevent sender lists the listeners' sockets
and then connects to each, and a monitor opened or closed in between aborts the whole process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator

import pyudev

log = logging.getLogger(__name__)

Listener = Callable[[pyudev.Device], None]

SUBSYSTEMS = ("usb", "block")  # what the framework waits for: boot stages on a port, the module's disk
RESCAN = 0.5  # s: a waiter looks again this often even without an event (one may lag what it announces, or be lost)


def monitor_source() -> str:
    """``udev`` when udevd runs (devices are ready when it announces them), else the kernel's own events."""
    return "udev" if os.path.exists("/run/udev/control") else "kernel"


class UeventHub:
    """The process's monitor; listeners subscribe for as long as they wait and run on its thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=monitor_source())
        for subsystem in SUBSYSTEMS:
            monitor.filter_by(subsystem)
        self._observer = pyudev.MonitorObserver(monitor, callback=self._dispatch, name="hil-uevents")
        self._observer.daemon = True
        self._observer.start()

    @contextlib.contextmanager
    def listening(self, listener: Listener) -> Iterator[None]:
        """``listener(device)`` sees every usb and block uevent from now until the block ends."""
        with self._lock:
            self._listeners.append(listener)
        try:
            yield
        finally:
            with self._lock:
                self._listeners.remove(listener)

    def _dispatch(self, device: pyudev.Device) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(device)
            except Exception:  # one broken listener must not silence the others or stop the thread
                log.exception("uevent listener %r failed on %s", listener, device.sys_path)


_hub: UeventHub | None = None
_hub_pid = 0
_hub_lock = threading.Lock()


def hub() -> UeventHub:
    """The process-wide hub, started on first use (and again in a forked child, whose thread did not survive)."""
    global _hub, _hub_pid
    with _hub_lock:
        if _hub is None or _hub_pid != os.getpid():
            _hub, _hub_pid = UeventHub(), os.getpid()
        return _hub
