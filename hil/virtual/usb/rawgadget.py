"""One device model on a dummy_hcd bus through Linux's raw_gadget: the kernel transport's ROM and second stages.

raw_gadget (drivers/usb/gadget/legacy/raw_gadget.c) hands every control request to user space, standard ones
included, so the model's own descriptors reach the host byte for byte (the string indices that tell a ROM from
a second stage, the BCM2835 ROM's odd endpoint) and control reads of any length are answered (gadgetfs clamps
them to 256 bytes, too short for a second stage's 260-byte file request). Debian builds it as no module, so the
guest kit compiles it from Debian's kernel source at setup time (:mod:`hil.virtual.guest.kit`).

Every wait in raw_gadget is interruptible and nothing else ends it, so leaving the bus signals the threads
blocked in its ioctls (SIGUSR2, with a handler that does nothing) and then closes the device, which
unregisters the gadget: the host sees the disconnect.

What a gadget cannot say here, as hardware would not either: a device receives only what it armed its OUT
endpoint for, so bulk data beyond an announced length is NAKed until the host's timeout rather than seen and
stalled; an OUT request's data stage is acknowledged before the model sees it.

A control request the model never answers needs care: raw_gadget stalls every later request while one is
unanswered, where hardware simply takes the host's next SETUP. So the device watches its bus's usbmon text for
the host giving the request up (its URB completing with -ENOENT or -ECONNRESET) and only then queues an answer
nobody will collect, which dummy_hcd drops when the next SETUP arrives; the host sees a timeout, then a device
that answers its retry, as on hardware.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import signal
import struct
import threading
import time
from pathlib import Path

from hil.errors import InfrastructureError
from hil.virtual.usb.descriptors import endpoint_descriptors
from hil.virtual.usb.device import Cancelled, ControlSetup, DeviceGone, Stall, Unresponsive, UsbDeviceModel

log = logging.getLogger(__name__)
DEVICE = Path("/dev/raw-gadget")
STAGE = "usb.transport"


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("U") << 8 | nr


INIT = _ioc(1, 0, 257)
RUN = _ioc(0, 1, 0)
EVENT_FETCH = _ioc(2, 2, 8)
EP0_WRITE, EP0_READ = _ioc(1, 3, 8), _ioc(3, 4, 8)
EP_ENABLE = _ioc(1, 5, 9)
EP_WRITE, EP_READ = _ioc(1, 7, 8), _ioc(3, 8, 8)
CONFIGURE = _ioc(0, 9, 0)
VBUS_DRAW = _ioc(1, 10, 4)
EP0_STALL = _ioc(0, 12, 0)
EP_SET_HALT = _ioc(1, 13, 4)
EVENT_CONNECT, EVENT_CONTROL = 1, 2
SPEED_FULL, SPEED_HIGH = 2, 3
SET_CONFIGURATION = 9
CHUNK = 64 * 1024  # bytes asked of an OUT endpoint at once, at most
POLL = 0.002  # s between looks at a model that has not armed its OUT endpoint yet
WAKE = signal.SIGUSR2
USBMON = Path("/sys/kernel/debug/usb/usbmon")


def enable_wakeups() -> None:
    """Install the do-nothing SIGUSR2 handler that lets :meth:`RawGadgetDevice.stop` interrupt raw_gadget's waits
    (Python installs handlers without SA_RESTART, so the ioctl returns EINTR). Only the main thread can."""
    if signal.getsignal(WAKE) not in (signal.SIG_DFL, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise InfrastructureError("the kernel USB transport is set up from the main thread (it needs a signal "
                                  "handler to end raw_gadget's waits)", stage=STAGE)
    signal.signal(WAKE, lambda signum, frame: None)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


def _ioctl(fd: int, request: int, arg: bytearray | int = 0) -> int:
    """ioctl(2) through ctypes, which lets go of the GIL while raw_gadget waits (fcntl.ioctl holds it when given
    a buffer, and the host side of the same process would stop with it); OSError as fcntl raises it."""
    if isinstance(arg, bytearray):
        ret = _libc.ioctl(fd, request, (ctypes.c_char * len(arg)).from_buffer(arg))
    else:
        ret = _libc.ioctl(fd, request, ctypes.c_void_p(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _io(ep: int, data: bytes | int) -> bytearray:
    """struct usb_raw_ep_io: the endpoint handle, flags, length, then the data (or room for it)."""
    if isinstance(data, int):
        return bytearray(struct.pack("<HHI", ep, 0, data)) + bytearray(data)
    return bytearray(struct.pack("<HHI", ep, 0, len(data)) + data)


def dummy_udc(bus: int) -> str:
    """The device controller of dummy_hcd bus ``bus`` (``usbN`` is ``dummy_udc.<N-1>`` when dummy_hcd is the
    guest's only host controller)."""
    return f"dummy_udc.{bus - 1}"


class RawGadgetDevice:
    """``model`` on dummy_hcd bus ``bus`` from :meth:`start` until :meth:`stop`."""

    def __init__(self, model: UsbDeviceModel, bus: int, device: Path = DEVICE):
        self.model = model
        self.bus = bus
        self.udc = dummy_udc(bus)
        self.device = device
        self.identity = model.identity
        self.full_speed = self.identity.speed == "full"
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._fd = -1
        self._threads: list[threading.Thread] = []
        self._configured = False
        self._late: threading.Thread | None = None

    def start(self) -> None:
        enable_wakeups()  # done already by the bus when it was made on the main thread
        self._fd = os.open(self.device, os.O_RDWR)
        init = self.udc.split(".")[0].encode().ljust(128, b"\0") + self.udc.encode().ljust(128, b"\0")
        try:
            _ioctl(self._fd, INIT, bytearray(init + bytes((SPEED_FULL if self.full_speed else SPEED_HIGH,))))
            _ioctl(self._fd, RUN, 0)
        except OSError:
            os.close(self._fd)
            raise
        self._spawn(self._ep0_loop, "raw-gadget-ep0")

    def stop(self) -> None:
        """Leave the bus: waits in raw_gadget are interrupted, the device closed, the host sees it go."""
        self._stop.set()
        self._cancel.set()
        deadline = time.monotonic() + 5
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pthread_kill(thread.ident or 0, WAKE)
                thread.join(0.05)
        if self._fd >= 0:
            os.close(self._fd)  # unregisters the gadget driver
            self._fd = -1

    def _spawn(self, target: object, name: str, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()
        return thread

    # --- ep0 ----------------------------------------------------------------------------------------

    def _ep0_loop(self) -> None:
        while not self._stop.is_set():
            event = bytearray(struct.pack("<II", 0, 8) + bytes(8))
            try:
                _ioctl(self._fd, EVENT_FETCH, event)
            except InterruptedError:
                continue
            except OSError as e:
                log.debug("raw_gadget event: %s", e)
                return
            kind, length = struct.unpack_from("<II", event)
            if kind == EVENT_CONTROL and length >= 8:
                self._setup(ControlSetup(*struct.unpack_from("<BBHHH", event, 8)))

    def _setup(self, setup: ControlSetup) -> None:
        if self._late is not None:  # its answer was dropped when this SETUP came: let it clear raw_gadget's state
            self._late.join(1)
            self._late = None
        try:
            data = b""
            if not setup.is_in and setup.wLength:
                data = self._ep0_read(setup.wLength)  # the data stage
            reply = self.model.control(setup, data, self._cancel)
            if setup.is_standard and setup.bRequest == SET_CONFIGURATION and not setup.is_in and setup.wValue:
                self._configure()
            if setup.is_in:
                io = _io(0, reply[:setup.wLength])
                _ioctl(self._fd, EP0_WRITE, io)
            elif not setup.wLength:
                self._ep0_read(0)  # the status stage
        except Stall:
            with contextlib.suppress(OSError):
                _ioctl(self._fd, EP0_STALL, 0)
        except (Unresponsive, Cancelled):  # no answer: the host's transfer times out
            self._late = self._spawn(self._late_answer, "raw-gadget-late", setup)
        except DeviceGone:
            self._stop.set()
        except OSError as e:
            log.debug("raw_gadget ep0: %s", e)

    def _late_answer(self, setup: ControlSetup) -> None:
        """Wait (in usbmon) for the host to give up ``setup``, then queue the answer dummy_hcd will drop."""
        abandoned = re.compile(rf" C C[io]:{self.bus}:\d+:0 -(2|104) ".encode())
        try:
            fd = os.open(USBMON / f"{self.bus}u", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            log.debug("raw_gadget: no usbmon to see the host give up (%s); the next request will stall", e)
            return
        try:
            seen = b""
            while not self._stop.is_set():
                try:
                    seen = seen[-200:] + os.read(fd, 65536)
                except BlockingIOError:
                    time.sleep(0.02)
                    continue
                if abandoned.search(seen):
                    break
            else:
                return
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # completed by dummy_hcd's drop (-EOVERFLOW) at the next SETUP
            if setup.is_in and setup.wLength:
                _ioctl(self._fd, EP0_WRITE, _io(0, b""))
            else:
                self._ep0_read(0)

    def _ep0_read(self, length: int) -> bytes:
        io = _io(0, length)
        got = _ioctl(self._fd, EP0_READ, io)
        return bytes(io[8:8 + got])

    # --- bulk ---------------------------------------------------------------------------------------

    def _configure(self) -> None:
        if self._configured:
            return
        self._configured = True
        config = self.identity.config_descriptors[0]
        for desc in endpoint_descriptors(config):
            enable = bytearray(desc + b"\0\0")  # struct usb_endpoint_descriptor has the two audio bytes
            if self.full_speed and desc[3] & 3 == 2:  # a full-speed bulk endpoint moves 64-byte packets
                enable[4:6] = min(64, int.from_bytes(desc[4:6], "little")).to_bytes(2, "little")
            handle = _ioctl(self._fd, EP_ENABLE, enable)
            address = desc[2]
            loop = self._in_loop if address & 0x80 else self._out_loop
            self._spawn(loop, f"raw-gadget-ep{address:02x}", handle, address)
        _ioctl(self._fd, VBUS_DRAW, config[8] * 2)
        _ioctl(self._fd, CONFIGURE, 0)

    def _out_loop(self, handle: int, address: int) -> None:
        pending = getattr(self.model, "out_pending", None)
        while not self._stop.is_set():
            want = pending(address) if pending is not None else 512
            if want <= 0:
                time.sleep(POLL)
                continue
            io = _io(handle, min(want, CHUNK))
            try:
                got = _ioctl(self._fd, EP_READ, io)
            except InterruptedError:
                continue
            except OSError as e:
                log.debug("raw_gadget ep%02x read: %s", address, e)
                return
            try:
                self.model.bulk_out(address, bytes(io[8:8 + got]), self._cancel)
            except (Unresponsive, Stall):
                return  # stops taking data: the host's next transfer is NAKed until its timeout
            except (DeviceGone, Cancelled):
                self._stop.set()
                return

    def _in_loop(self, handle: int, address: int) -> None:
        while not self._stop.is_set():
            try:
                data = self.model.bulk_in(address, CHUNK, self._cancel)
            except Unresponsive:
                time.sleep(0.05)
                continue
            except Stall:
                with contextlib.suppress(OSError):
                    _ioctl(self._fd, EP_SET_HALT, handle)
                return
            except (DeviceGone, Cancelled):
                return
            try:
                _ioctl(self._fd, EP_WRITE, _io(handle, data))
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno != errno.ESHUTDOWN:
                    log.debug("raw_gadget ep%02x write: %s", address, e)
                return
