"""Waiting for a USB port to change, driven by uevents rather than sleeps.

The process's uevent monitor (:mod:`hil.uevents`) wakes the waiter whenever the device on *this* port is added or
removed; the caller's probe then looks at what libusb sees. libusb learns of a device through its own
hotplug thread a few milliseconds after the uevent, so right after an event on our port the probe is
repeated with a short, doubling back-off until libusb has caught up; and at least every half second
whatever happens, so a late libusb or a lost event costs that much, not the stage's timeout.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import pyudev

from hil import uevents
from hil.usbport import UsbPort

T = TypeVar("T")

_CATCH_UP_FIRST = 0.002  # s: first re-probe after an event on our port


class PortEvents:
    """Uevents of one port, from the moment the context is entered; ``on_event(action)`` sees each one.

    They come from the process's one uevent monitor (:mod:`hil.uevents`), which is drained all the time."""

    def __init__(self, port: UsbPort, *, on_event: Callable[[str], None] = lambda action: None,
                 clock: Callable[[], float] = time.monotonic):
        self.port = str(port)
        self._on_event = on_event
        self._clock = clock
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._listening: contextlib.ExitStack | None = None

    def __enter__(self) -> PortEvents:
        self._listening = contextlib.ExitStack()
        self._listening.enter_context(uevents.hub().listening(self._seen))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None

    def _seen(self, device: pyudev.Device) -> None:
        if device.subsystem == "usb" and device.device_type == "usb_device" and device.sys_name == self.port:
            action = device.action or ""
            self._on_event(action)
            self._queue.put(action)

    def wait(self, probe: Callable[[], T | None], deadline: float) -> T | None:
        """The probe's first answer that is not None, or None at ``deadline`` (a ``clock`` time)."""
        assert self._listening is not None, "use PortEvents as a context manager"
        catch_up = uevents.RESCAN
        while True:
            answer = probe()
            if answer is not None:
                return answer
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            try:
                self._queue.get(timeout=min(remaining, catch_up))
            except queue.Empty:  # libusb may still be catching up with the last event: look again, back off
                catch_up = min(catch_up * 2, uevents.RESCAN)
            else:
                catch_up = _CATCH_UP_FIRST
