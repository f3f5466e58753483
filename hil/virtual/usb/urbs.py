"""The bookkeeping of usbfs URBs on the virtual bus: who opened the node, what is in flight, what is done.

One :class:`Client` per open file descriptor on a device node (a libusb handle, in any process); one
:class:`EndpointWorker` per endpoint, so a device model handles one endpoint's transfers in order and may
block like a busy device.
"""

from __future__ import annotations

import errno
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hil.virtual.usb import usbfs

DEFERRED = object()  # an ioctl handler's "I complete this request later"


class Errno(Exception):
    def __init__(self, code: int):
        super().__init__(errno.errorcode.get(code, str(code)))
        self.code = code


class EndpointWorker:
    """One endpoint's queue: a device handles the transfers of one endpoint in order."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def put(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


@dataclass(eq=False)
class Client:
    """One open file descriptor on the device node (libusb handle), in any process."""

    ioctl: Any  # UMockdev.IoctlClient
    urbs: dict[int, Urb] = field(default_factory=dict)  # in flight, by the URB's address in the client
    done: deque[Urb] = field(default_factory=deque)  # completed, waiting to be reaped
    claimed: set[int] = field(default_factory=set)
    parked: bool = False  # a blocking REAPURB waits for the next completion


@dataclass(eq=False)
class Urb:
    client: Client
    addr: int
    info: usbfs.Urb
    cancel: threading.Event
    status: int | None = None  # None while in flight
    data: bytes = b""  # IN data for the reaper
    actual: int = 0


Outcome = tuple[int, bytes, int]  # usbfs status, IN data, actual length
Call = Callable[[threading.Event], Outcome]  # one URB's model call, given its cancel event


def in_outcome(reply: bytes, limit: int, flags: int) -> Outcome:
    if len(reply) > limit:
        return -errno.EOVERFLOW, reply[:limit], limit  # babble
    if len(reply) < limit and flags & usbfs.URB_SHORT_NOT_OK:
        return -errno.EREMOTEIO, reply, len(reply)
    return 0, reply, len(reply)
