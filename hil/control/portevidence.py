"""What a person reproducing a USB host bug needs from one boot attempt on one port.

A host-controller incompatibility is only worth reporting with the evidence Raspberry Pi's usbboot tracker asks
for (real-hardware-review.md, "The CM1 packet quirk"): the kernel's log lines for that port since the attempt
began, the usbmon text trace of that bus, the speed each boot stage enumerated at, and the controller, driver
and kernel. This module gathers the first two while an attempt runs (started before it, collected after it)
and says how to enable what is missing instead of failing.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from hil.usbport import UsbPort

KMSG = Path("/dev/kmsg")
USBMON = Path("/sys/kernel/debug/usb/usbmon")
USBMON_LIMIT = 4 * 1024 * 1024  # bytes of usbmon text kept per attempt (a 30 MB image is ~1M lines otherwise)
_POLL = 0.05  # s between usbmon reads; the kernel keeps a few thousand events per reader
KMSG_HINT = ("run as root, or let users read the kernel log: `sysctl kernel.dmesg_restrict=0`")
USBMON_HINT = ("as root: `mount -t debugfs none /sys/kernel/debug` (if /sys/kernel/debug is empty) and "
               "`modprobe usbmon`; the trace is then in /sys/kernel/debug/usb/usbmon/<bus>u")


def port_pattern(port: str) -> re.Pattern[str]:
    """Kernel messages about ``port`` ("usb 1-1.3: ...", "usb-storage 1-1.3:1.0: ...") and about the hub port
    it hangs off ("usb 1-1-port3: ...", "usb usb1-port1: ..."), not about devices further down."""
    path = UsbPort(port)
    name = str(path)
    hub = (f"{path.bus}-{'.'.join(map(str, path.ports[:-1]))}" if len(path.ports) > 1 else f"usb{path.bus}")
    return re.compile(rf"(?<![\w.-]){re.escape(name)}(?=:)|(?<![\w.-]){re.escape(hub)}-port{path.ports[-1]}(?=:)")


def kernel_message(record: str) -> str:
    """The text of one /dev/kmsg record ("6,1234,5678,-;usb 1-1: ...") or a plain dmesg line."""
    prefix, sep, text = record.partition(";")
    return text if sep and re.fullmatch(r"\d+,\d+,\d+,[^;]*", prefix) else record


@dataclass
class PortEvidence:
    """Kernel log lines of one port and the usbmon text of its bus during one attempt (a context manager)."""

    port: str
    kmsg: Path = KMSG
    usbmon: Path = USBMON
    kernel_log: list[str] = field(default_factory=list)
    kernel_log_note: str = ""
    usbmon_text: str | None = None
    usbmon_note: str = ""
    _kmsg_fd: int | None = field(default=None, repr=False)
    _mon_fd: int | None = field(default=None, repr=False)
    _mon: bytearray = field(default_factory=bytearray, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self) -> PortEvidence:
        self._kmsg_fd = self._open(self.kmsg, "kernel log", KMSG_HINT)
        if self._kmsg_fd is not None:
            os.lseek(self._kmsg_fd, 0, os.SEEK_END)  # only what the kernel logs from now on
        bus = UsbPort(self.port).bus
        self._mon_fd = self._open(self.usbmon / f"{bus}u", "usbmon", USBMON_HINT)
        if self._mon_fd is not None:
            try:
                os.lseek(self._mon_fd, 0, os.SEEK_END)  # a file's older text is not this attempt's
            except OSError as e:  # usbmon itself: not seekable, and a reader sees only events from its open on
                if e.errno != errno.ESPIPE:
                    raise
            self._thread = threading.Thread(target=self._drain_usbmon, name=f"usbmon-{bus}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.collect()

    def collect(self) -> None:
        """Stop listening; the kernel lines and usbmon text so far stay in the object."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._mon_fd is not None:
            self._read_usbmon()
            os.close(self._mon_fd)
            self._mon_fd = None
            self.usbmon_text = self._mon.decode("ascii", "replace")
        if self._kmsg_fd is not None:
            pattern = port_pattern(self.port)
            for record in self._read_all(self._kmsg_fd).decode("utf-8", "replace").splitlines():
                text = kernel_message(record)
                if not record.startswith(" ") and pattern.search(text):  # " KEY=value" lines continue a record
                    self.kernel_log.append(text)
            os.close(self._kmsg_fd)
            self._kmsg_fd = None

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
                "kernel_log": list(self.kernel_log), "kernel_log_note": self.kernel_log_note,
                "usbmon": self.usbmon_text, "usbmon_note": self.usbmon_note}

    def _open(self, path: Path, what: str, hint: str) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            note = f"{what} unavailable ({path}: {e.strerror or e}). To capture it, {hint}"
            if what == "usbmon":
                self.usbmon_note = note
            else:
                self.kernel_log_note = note
            return None

    @staticmethod
    def _read_all(fd: int) -> bytes:
        """Everything readable now: /dev/kmsg gives one record per read and EAGAIN at the end; a file gives EOF."""
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EPIPE:  # EPIPE: records were overwritten before we read them; go on
                    break
                continue
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _read_usbmon(self) -> None:
        assert self._mon_fd is not None
        data = self._read_all(self._mon_fd)
        room = USBMON_LIMIT - len(self._mon)
        if room > 0:
            self._mon += data[:room]
        elif data and not self.usbmon_note:
            self.usbmon_note = f"usbmon text cut at {USBMON_LIMIT} bytes"

    def _drain_usbmon(self) -> None:
        while not self._stop.wait(_POLL):
            self._read_usbmon()
