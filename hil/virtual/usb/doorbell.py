"""The usbfs node as a FIFO that wakes pollers exactly while an URB waits to be reaped.

libusb sleeps in ``poll(POLLOUT)`` on the node until an URB is reapable. A regular file is always writable,
so libusb would spin on ``REAPURBNDELAY`` and burn a core while a host waits on a silent device. The FIFO is
kept full (not writable) and drained exactly while URBs wait to be reaped, which wakes pollers in any process.
"""

from __future__ import annotations

import fcntl
import os


class Doorbell:
    """The usbfs node as a FIFO that is writable exactly while an URB waits to be reaped."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkfifo(path, 0o666)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, 4096)  # one page: a single write makes it full
        self._ready = True
        self.set(False)

    def set(self, ready: bool) -> None:
        if ready == self._ready or self._fd < 0:
            return
        try:
            while True:
                if ready:
                    os.read(self._fd, 65536)
                else:
                    os.write(self._fd, bytes(4096))
        except BlockingIOError:
            pass
        self._ready = ready

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
