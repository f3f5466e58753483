"""USB devices on a umockdev testbed, reached through the real libusb, pyusb and pyudev.

The testbed fakes sysfs, udev events and ``/dev/bus/usb``; every usbfs ioctl a host issues on a device node
is answered here (on umockdev's worker thread) and turned into calls on a :class:`UsbDeviceModel`, each run
on a worker thread per endpoint so a model may block like a busy device.

Why a FIFO as the usbfs node: libusb sleeps in ``poll(POLLOUT)`` on the node until an URB is reapable. A
regular file is always writable, so libusb would spin on ``REAPURBNDELAY`` and burn a core while a host
waits on a silent device. The FIFO is kept full (not writable) and drained exactly while URBs wait to be
reaped, which wakes pollers in any process.

umockdev allows one testbed per process, so :class:`UsbBus` is a process-wide singleton (``UsbBus.get()``).
While it exists this process (and children that inherit its C environment) see the testbed's ``/sys``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import gc
import logging
import os
import platform
import queue
import re
import shutil
import stat
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

from hil.errors import InfrastructureError, InputError  # noqa: E402
from hil.hostenv import umockdev_active  # noqa: E402
from hil.virtual.journal import Journal  # noqa: E402
from hil.virtual.usb import sysfs, usbfs  # noqa: E402
from hil.virtual.usb.descriptors import (  # noqa: E402
    CLEAR_FEATURE,
    INTERRUPT,
    SET_CONFIGURATION,
    SET_INTERFACE,
    Descriptors,
    Endpoint,
    Interface,
    StandardRequests,
    config_descriptor,
)
from hil.virtual.usb.device import (  # noqa: E402
    BlockChild,
    Cancelled,
    ControlSetup,
    DeviceGone,
    Stall,
    Unresponsive,
    UsbDeviceModel,
)
from hil.virtual.usb.hostprofiles import Admission, HostProfile, controller_spec  # noqa: E402

log = logging.getLogger(__name__)
STAGE = "usb.transport"
_PORT_PATH = re.compile(r"^(\d+)-(\d+(?:\.\d+){0,5})$")
_DEFERRED = object()  # an ioctl handler's "I complete this request later"
_DRIVERS = {8: "usb-storage", 9: "hub"}  # the kernel drivers that bind interfaces of these classes


class _Errno(Exception):
    def __init__(self, code: int):
        super().__init__(errno.errorcode.get(code, str(code)))
        self.code = code


class _Doorbell:
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


class _Worker:
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
class _Client:
    """One open file descriptor on the device node (libusb handle), in any process."""

    ioctl: Any  # UMockdev.IoctlClient
    urbs: dict[int, _Urb] = field(default_factory=dict)  # in flight, by the URB's address in the client
    done: deque[_Urb] = field(default_factory=deque)  # completed, waiting to be reaped
    claimed: set[int] = field(default_factory=set)
    parked: bool = False  # a blocking REAPURB waits for the next completion


@dataclass(eq=False)
class _Urb:
    client: _Client
    addr: int
    info: usbfs.Urb
    cancel: threading.Event
    status: int | None = None  # None while in flight
    data: bytes = b""  # IN data for the reaper
    actual: int = 0


Outcome = tuple[int, bytes, int]  # usbfs status, IN data, actual length
Call = Callable[[threading.Event], Outcome]  # one URB's model call, given its cancel event


def _in_outcome(reply: bytes, limit: int, flags: int) -> Outcome:
    if len(reply) > limit:
        return -errno.EOVERFLOW, reply[:limit], limit  # babble
    if len(reply) < limit and flags & usbfs.URB_SHORT_NOT_OK:
        return -errno.EREMOTEIO, reply, len(reply)
    return 0, reply, len(reply)


class _Enumeration:
    """One model on the bus between attach and detach: its sysfs records and its usbfs ioctls."""

    def __init__(self, node: sysfs.UsbNode, model: UsbDeviceModel, controller: sysfs.HostController,
                 drivers: dict[int, str], journal: Journal | None, admission: Admission):
        self.node = node
        self.admission = admission  # the host profile's verdict: a refused device fails every transfer
        self.model = model
        self.config = sysfs.parse_config(model.identity.config_descriptors[0])
        self.drivers = drivers
        self.journal = journal
        self.records: list[sysfs.Record] = []
        self.scsi_host: list[sysfs.Record] = []  # host + target, once the first disk appears
        self.scsi_host_number = -1
        self.disks: list[tuple[BlockChild, sysfs.DiskNode, list[sysfs.Record]]] = []
        self.doorbell: _Doorbell | None = None
        self.gone = False
        self._caps = controller.usbfs_caps
        self._interfaces = {i.number: i for i in self.config.interfaces}
        self._ep_interface = {ep: i.number for i in self.config.interfaces for ep in i.endpoints}
        self._lock = threading.Lock()
        self._unplugged = threading.Event()
        self._clients: dict[Any, _Client] = {}
        self._claims: dict[int, _Client] = {}
        self._workers: dict[int, _Worker] = {}
        self._handlers: dict[int, Callable[[_Client, Any], Any]] = {
            usbfs.SUBMITURB: self._submit, usbfs.REAPURBNDELAY: self._reap, usbfs.REAPURB: self._reap,
            usbfs.DISCARDURB: self._discard, usbfs.GET_CAPABILITIES: self._capabilities,
            usbfs.CLAIMINTERFACE: self._claim_ioctl, usbfs.RELEASEINTERFACE: self._release,
            usbfs.SETINTERFACE: self._set_interface, usbfs.SETCONFIGURATION: self._set_configuration,
            usbfs.CLEAR_HALT: self._clear_halt, usbfs.RESET: self._reset,
            usbfs.CONNECTINFO: self._connectinfo,
            usbfs.GET_SPEED: lambda c, ic: usbfs.SPEED_CODES[self.node.speed],
            usbfs.GETDRIVER: self._getdriver, usbfs.DISCONNECT_CLAIM: self._disconnect_claim,
            usbfs.IOCTL: self._driver_ioctl,
        }

    @property
    def idle(self) -> bool:
        """Gone and no host holds the node open any more: its ioctl handler can go."""
        with self._lock:
            return self.gone and not self._clients

    def record(self, what: str, **details: Any) -> None:
        if self.journal is not None:
            self.journal.record("usb", what, port=self.node.name, **details)

    # -- umockdev callbacks (worker thread) --------------------------------------------------------------

    def on_ioctl(self, _handler: Any, ic: Any) -> bool:
        request = ic.get_request() & 0xFFFFFFFF
        handler = self._handlers.get(request)
        try:
            with self._lock:
                client = self._clients.get(ic) or self._clients.setdefault(ic, _Client(ic))
                if handler is None:
                    log.debug("%s: unhandled usbfs ioctl %#x", self.node.name, request)
                    raise _Errno(errno.ENOTTY)
                if self.gone and request not in (usbfs.REAPURB, usbfs.REAPURBNDELAY, usbfs.DISCARDURB):
                    raise _Errno(errno.ENODEV)
                result = handler(client, ic)
        except _Errno as e:
            ic.complete(-1, e.code)
        except Exception:
            log.exception("%s: usbfs %s failed", self.node.name, usbfs.NAMES.get(request, hex(request)))
            ic.complete(-1, errno.EIO)
        else:
            if result is not _DEFERRED:
                ic.complete(result, 0)
        return True

    def on_vanished(self, _handler: Any, ic: Any) -> None:
        with self._lock:
            client = self._clients.pop(ic, None)
            if client is None:
                return
            for urb in client.urbs.values():
                urb.status = -errno.ENOENT
                urb.cancel.set()
            for number in client.claimed:
                self._claims.pop(number, None)
            self._ring()

    # -- URBs ----------------------------------------------------------------------------------------------

    def _submit(self, c: _Client, ic: Any) -> int:
        urb_data = ic.get_arg().resolve(0, usbfs.URB_SIZE)
        info = usbfs.Urb.parse(bytes(urb_data.retrieve()))
        urb = _Urb(c, urb_data.client_addr, info, threading.Event())
        call: Call
        if info.type == usbfs.URB_TYPE_CONTROL:
            if info.buffer_length < usbfs.SETUP_SIZE:
                raise _Errno(errno.EINVAL)
            raw = bytes(urb_data.resolve(usbfs.URB_BUFFER_OFFSET, info.buffer_length).retrieve())
            setup = ControlSetup(*struct.unpack("<BBHHH", raw[: usbfs.SETUP_SIZE]))
            if setup.wLength > info.buffer_length - usbfs.SETUP_SIZE:
                raise _Errno(errno.EINVAL)
            data = b"" if setup.is_in else raw[usbfs.SETUP_SIZE : usbfs.SETUP_SIZE + setup.wLength]
            call = self._control_call(setup, data, info.flags)
            key = 0
        elif info.type in (usbfs.URB_TYPE_BULK, usbfs.URB_TYPE_INTERRUPT):
            number = self._ep_interface.get(info.endpoint)
            if number is None:
                raise _Errno(errno.ENOENT)
            self._claim(c, number)  # usbfs claims the interface implicitly, as checkintf() does
            call = self._bulk_call(urb_data, info)
            key = info.endpoint
        else:
            raise _Errno(errno.EINVAL)  # isochronous transfers are not modelled
        if self.admission.refusal is not None:
            call = self._refused
        c.urbs[urb.addr] = urb
        self._worker(key).put(lambda: self._run(urb, call))
        return 0

    def _refused(self, cancel: threading.Event) -> Outcome:
        """The host profile refused the device: its controller ends each transfer with a transaction error."""
        assert self.admission.refusal is not None
        self.record("refused transfer", errno=errno.errorcode[self.admission.refusal])
        return -self.admission.refusal, b"", 0

    def _control_call(self, setup: ControlSetup, data: bytes, flags: int) -> Call:
        def call(cancel: threading.Event) -> Outcome:
            reply = self.model.control(setup, data, cancel)
            return _in_outcome(reply, setup.wLength, flags) if setup.is_in else (0, b"", setup.wLength)

        return call

    def _bulk_call(self, urb_data: Any, info: usbfs.Urb) -> Call:
        if info.is_in:
            return lambda cancel: _in_outcome(
                self.model.bulk_in(info.endpoint, info.buffer_length, cancel), info.buffer_length, info.flags)
        data = (bytes(urb_data.resolve(usbfs.URB_BUFFER_OFFSET, info.buffer_length).retrieve())
                if info.buffer_length else b"")

        def call(cancel: threading.Event) -> Outcome:
            accepted = self.model.bulk_out(info.endpoint, data, cancel)
            return 0, b"", max(0, min(accepted, len(data)))

        return call

    def _run(self, urb: _Urb, call: Call) -> None:
        """On the endpoint's worker: ask the model, map its outcome to a usbfs status."""
        if urb.cancel.is_set():
            return
        try:
            status, data, actual = call(urb.cancel)
        except Unresponsive:
            urb.cancel.wait()  # no handshake: only a discard or an unplug ends it (and completes it)
            return
        except Stall:
            status, data, actual = -errno.EPIPE, b"", 0
        except DeviceGone:
            status, data, actual = -errno.ESHUTDOWN, b"", 0
        except Cancelled:
            status, data, actual = -errno.ENOENT, b"", 0
        except Exception:
            log.exception("%s: model failed on endpoint %#04x", self.node.name, urb.info.endpoint)
            status, data, actual = -errno.EPROTO, b"", 0
        with self._lock:
            if urb.status is None:
                self._complete(urb, status, data, actual)

    def _complete(self, urb: _Urb, status: int, data: bytes = b"", actual: int = 0) -> None:
        """Lock held. The URB becomes reapable (or goes straight to a parked blocking REAPURB)."""
        urb.status, urb.data, urb.actual = status, data, actual
        c = urb.client
        c.urbs.pop(urb.addr, None)
        if c.parked:
            c.parked = False
            try:
                self._deliver(c.ioctl, urb)
                c.ioctl.complete(0, 0)
            except Exception:
                log.exception("%s: completing a blocking REAPURB failed", self.node.name)
            return
        c.done.append(urb)
        self._ring()

    def _ring(self) -> None:
        """Lock held: the node polls writable while any client has something to reap."""
        if self.doorbell is not None:
            self.doorbell.set(any(c.done for c in self._clients.values()))

    def _deliver(self, ic: Any, urb: _Urb) -> None:
        """Write the URB's result into the reaper's memory and hand back its address."""
        slot = ic.get_arg().resolve(0, 8)  # the reaper's ``struct usbdevfs_urb *`` variable
        slot.update(0, urb.addr.to_bytes(8, "little"))
        urb_data = slot.resolve(0, usbfs.URB_SIZE)
        if urb.data:
            offset = usbfs.SETUP_SIZE if urb.info.type == usbfs.URB_TYPE_CONTROL else 0
            buffer = urb_data.resolve(usbfs.URB_BUFFER_OFFSET, offset + len(urb.data))
            buffer.update(offset, urb.data)
        assert urb.status is not None
        urb_data.update(usbfs.URB_STATUS_OFFSET, usbfs.i32_bytes(urb.status))
        urb_data.update(usbfs.URB_ACTUAL_LENGTH_OFFSET, usbfs.i32_bytes(urb.actual))

    def _reap(self, c: _Client, ic: Any) -> object:
        if c.done:
            urb = c.done.popleft()
            self._ring()
            self._deliver(ic, urb)
            return 0
        if self.gone:
            raise _Errno(errno.ENODEV)
        if ic.get_request() & 0xFFFFFFFF == usbfs.REAPURBNDELAY:
            raise _Errno(errno.EAGAIN)
        c.parked = True
        return _DEFERRED

    def _discard(self, c: _Client, ic: Any) -> int:
        urb = c.urbs.get(int.from_bytes(bytes(ic.get_arg().retrieve())[:8], "little"))
        if urb is None:
            raise _Errno(errno.EINVAL)  # already completed: libusb then reaps it normally
        urb.cancel.set()
        self._complete(urb, -errno.ENOENT)
        return 0

    # -- device and interface state -------------------------------------------------------------------

    def _arg_u32(self, ic: Any, size: int = 4, offset: int = 0) -> int:
        return usbfs.u32(bytes(ic.get_arg().resolve(0, size).retrieve()), offset)

    def _capabilities(self, c: _Client, ic: Any) -> int:
        ic.get_arg().resolve(0, 4).update(0, self._caps.to_bytes(4, "little"))
        return 0

    def _connectinfo(self, c: _Client, ic: Any) -> int:
        ic.get_arg().resolve(0, 8).update(0, struct.pack("<IB3x", self.node.devnum, self.node.speed == "low"))
        return 0

    def _claim(self, c: _Client, number: int) -> None:
        if number not in self._interfaces:
            raise _Errno(errno.ENOENT)
        holder = self._claims.get(number)
        if number in self.drivers or (holder is not None and holder is not c):
            raise _Errno(errno.EBUSY)
        self._claims[number] = c
        c.claimed.add(number)

    def _claim_ioctl(self, c: _Client, ic: Any) -> int:
        self._claim(c, self._arg_u32(ic))
        return 0

    def _release(self, c: _Client, ic: Any) -> int:
        number = self._arg_u32(ic)
        if self._claims.get(number) is not c:
            raise _Errno(errno.EINVAL)
        del self._claims[number]
        c.claimed.discard(number)
        return 0

    def _getdriver(self, c: _Client, ic: Any) -> int:
        arg = ic.get_arg().resolve(0, 260)
        driver = self.drivers.get(usbfs.u32(bytes(arg.retrieve())))
        if driver is None:
            raise _Errno(errno.ENODATA)
        arg.update(4, driver.encode() + b"\0")
        return 0

    def _disconnect_claim(self, c: _Client, ic: Any) -> int:
        number = self._arg_u32(ic, 264)
        if number in self.drivers:
            raise _Errno(errno.EBUSY)  # unbinding the virtual kernel driver is not modelled
        self._claim(c, number)
        return 0

    def _driver_ioctl(self, c: _Client, ic: Any) -> int:
        raw = bytes(ic.get_arg().resolve(0, 16).retrieve())
        number, code = struct.unpack_from("<iI", raw)
        if code == usbfs.CONNECT:
            return 0
        if code != usbfs.DISCONNECT:
            raise _Errno(errno.ENOTTY)
        raise _Errno(errno.EBUSY if number in self.drivers else errno.ENODATA)

    def _set_interface(self, c: _Client, ic: Any) -> object:
        number, alternate = struct.unpack("<II", bytes(ic.get_arg().resolve(0, 8).retrieve()))
        self._claim(c, number)
        interface = self._interfaces[number]
        if alternate not in interface.alternates:
            raise _Errno(errno.EINVAL)
        self.record("set_interface", interface=number, alternate=alternate)
        # Linux accepts a stall when the interface has only the one setting (usb_set_interface)
        return self._standard(ic, ControlSetup(0x01, SET_INTERFACE, alternate, number, 0),
                              stall_ok=len(interface.alternates) == 1)

    def _set_configuration(self, c: _Client, ic: Any) -> object:
        value = self._arg_u32(ic)
        if value != self.config.value:
            log.warning("%s: host asked for configuration %d; only %d is modelled",
                        self.node.name, value, self.config.value)
            raise _Errno(errno.EINVAL)
        self.record("set_configuration", value=value)
        return self._standard(ic, ControlSetup(0x00, SET_CONFIGURATION, value, 0, 0))

    def _clear_halt(self, c: _Client, ic: Any) -> object:
        endpoint = self._arg_u32(ic)
        number = self._ep_interface.get(endpoint)
        if number is None:
            raise _Errno(errno.ENOENT)
        self._claim(c, number)
        self.record("clear_halt", endpoint=endpoint)
        return self._standard(ic, ControlSetup(0x02, CLEAR_FEATURE, 0, endpoint, 0))

    def _reset(self, c: _Client, ic: Any) -> int:
        log.info("%s: host reset the device (accepted; the model is not re-enumerated)", self.node.name)
        self.record("reset")
        return 0

    def _standard(self, ic: Any, setup: ControlSetup, stall_ok: bool = False) -> object:
        """A request the kernel sends to the device on the host's behalf; the ioctl ends when it does."""

        def job() -> None:
            result = (0, 0)
            try:
                if self.gone:
                    raise DeviceGone()
                if self.admission.refusal is not None:
                    raise _Errno(self.admission.refusal)
                self.model.control(setup, b"", self._unplugged)
            except Stall:
                result = (0, 0) if stall_ok else (-1, errno.EPIPE)
            except (DeviceGone, Cancelled):
                result = (-1, errno.ENODEV)
            except _Errno as e:
                result = (-1, e.code)
            except Unresponsive:
                result = (-1, errno.ETIMEDOUT)
            except Exception:
                log.exception("%s: model failed on a standard request", self.node.name)
                result = (-1, errno.EPROTO)
            ic.complete(*result)

        self._worker(0).put(job)
        return _DEFERRED

    def _worker(self, endpoint: int) -> _Worker:
        worker = self._workers.get(endpoint)
        if worker is None:
            worker = self._workers[endpoint] = _Worker(f"usb {self.node.name} ep{endpoint:#04x}")
        return worker

    def unplug(self) -> None:
        """The device leaves the bus: transfers in flight end as gone, later ioctls fail with ENODEV."""
        with self._lock:
            self.gone = True
            self._unplugged.set()
            for c in self._clients.values():
                for urb in list(c.urbs.values()):
                    urb.cancel.set()
                    self._complete(urb, -errno.ENODEV)
                if c.parked:
                    c.parked = False
                    c.ioctl.complete(-1, errno.ENODEV)
            for worker in self._workers.values():
                worker.stop()
            self._workers.clear()


class _HubModel:
    """Root and intermediate hubs: chapter 9 requests only. They exist because libusb derives a device's
    port path from the hub devices it finds, and because a host may open any device it lists."""

    def __init__(self, descriptors: Descriptors):
        self.identity = descriptors.identity()
        self._standard = StandardRequests(descriptors)

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        reply = self._standard.handle(setup, data)
        if reply is None:
            raise Stall("hub class requests are not modelled")
        return reply

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        raise Stall("a hub has no bulk endpoints")

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        raise Stall("a hub has no bulk endpoints")


def _hub(vid: int, pid: int, bcd: int, strings: dict[int, str]) -> _HubModel:
    device = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 9, 0, 1, 64, vid, pid, bcd,
                         3 if 3 in strings else 1, 2, 1 if 3 in strings else 0, 1)
    status = Interface(0, 9, 0, 0, (Endpoint(0x81, INTERRUPT, 4, 12),))
    return _HubModel(Descriptors(device, config_descriptor((status,), attributes=0xE0, max_power_ma=0),
                                 strings, "high"))


@dataclass
class _Bus:
    """One USB bus: its host controller, root hub and the hubs created for port paths."""

    number: int
    controller: sysfs.HostController
    profile: HostProfile
    pci_syspath: str
    hubs: dict[str, _Enumeration] = field(default_factory=dict)  # "usb1", "1-1", ...
    next_devnum: int = 1

    @property
    def pci_name(self) -> str:
        return self.pci_syspath.rsplit("/", 1)[1]


class UsbPort:
    """A downstream port such as ``1-1.4``; implements :class:`hil.virtual.usb.device.UsbBusPort`."""

    def __init__(self, bus: UsbBus, port: str, bus_number: int, hub: str, journal: Journal | None):
        self.port = port
        self.journal = journal
        self._bus = bus
        self._bus_number = bus_number
        self._hub = hub  # name of the hub this port belongs to
        self._current: _Enumeration | None = None

    @property
    def attached(self) -> UsbDeviceModel | None:
        current = self._current
        return current.model if current else None

    @property
    def devname(self) -> str | None:
        """``/dev/bus/usb/BBB/DDD`` of the attached device (a new DDD at every attach)."""
        current = self._current
        return current.node.devname if current else None

    @property
    def disks(self) -> tuple[str, ...]:
        """``/dev/sdX`` of the attached device's disks, by LUN."""
        current = self._current
        return tuple(node.devname for _, node, _ in current.disks) if current else ()

    def attach(self, device: UsbDeviceModel) -> None:
        with self._bus._lock:
            self._bus._require_open()
            if self._current is not None:
                raise InfrastructureError(f"USB port {self.port} already has a device; detach it first",
                                          stage=STAGE)
            self._current = self._bus._plug(self._bus_number, self._hub, self.port, device, self.journal)
            self._current.record("attach", devname=self._current.node.devname,
                                 id=f"{device.identity.vid:04x}:{device.identity.pid:04x}")
            if device.identity.disks:
                self._bus._set_disks(self._current, device.identity.disks)

    def detach(self) -> None:
        with self._bus._lock:
            current, self._current = self._current, None
            if current is not None:
                current.record("detach")
                self._bus._unplug(current)

    def update_disks(self, disks: tuple[BlockChild, ...]) -> None:
        with self._bus._lock:
            if self._current is None:
                raise InfrastructureError(f"USB port {self.port} has no device to give disks to", stage=STAGE)
            self._bus._set_disks(self._current, disks)


UEVENT_QUEUE = 4096  # datagrams a uevent listener may fall behind; setup.sh sets it
_QLEN_FILE = "/proc/sys/net/unix/max_dgram_qlen"


def uevent_queue_shortfall(qlen_file: str = _QLEN_FILE) -> str | None:
    """Why this host may abort the virtual rig, or None.

    umockdev 0.17.16 sends each uevent to every listener's socket without waiting and aborts the process
    on EAGAIN; a listener's queue holds ``net.unix.max_dgram_qlen`` datagrams (10 by default), fewer than
    one mass-storage plug sends to a listener that is busy for a moment."""
    try:
        with open(qlen_file) as f:
            qlen = int(f.read())
    except (OSError, ValueError):
        return None
    if qlen >= UEVENT_QUEUE:
        return None
    return (f"net.unix.max_dgram_qlen is {qlen}: umockdev may abort the run when a uevent listener falls "
            f"behind. Fix: sysctl -w net.unix.max_dgram_qlen={UEVENT_QUEUE} (setup.sh does this)")


class UsbBus:
    """The process's virtual USB: host controllers, hubs and ports on one umockdev testbed."""

    _instance: ClassVar[UsbBus | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()
    _closed: ClassVar[bool] = False

    @classmethod
    def get(cls) -> UsbBus:
        """The process-wide bus, created on first use and kept until the process ends.

        There is no second one: libusb watches the first testbed's uevents and keeps its device list from
        them, as does the process's uevent monitor (:mod:`hil.uevents`), so they would never see a new one."""
        with cls._instance_lock:
            if cls._instance is None:
                if cls._closed:
                    raise InfrastructureError(
                        "this process's virtual USB bus was closed, and libusb and the uevent monitor here stay "
                        "bound to it. Fix: use the virtual rig from a new process", stage=STAGE)
                cls._instance = cls()
                atexit.register(cls._instance.close)
            return cls._instance

    def __init__(self) -> None:
        if UsbBus._instance is not None:
            raise InfrastructureError("a UsbBus already exists in this process; use UsbBus.get()",
                                      stage=STAGE)
        if not umockdev_active():
            raise InfrastructureError(
                "the virtual USB bus needs umockdev's preload library; run the command under "
                "`umockdev-wrapper` (apt package umockdev)", stage=STAGE)
        shortfall = uevent_queue_shortfall()
        if shortfall:
            log.warning("%s", shortfall)
        self._lock = threading.RLock()
        self._testbed: Any = UMockdev.Testbed.new()
        self.root_dir: str = self._testbed.get_root_dir()
        self._buses: dict[int, _Bus] = {}
        self._ports: dict[str, UsbPort] = {}
        self._handlers: dict[str, _Enumeration] = {}  # device node -> its enumeration, until retired
        self._sd_names: set[str] = set()
        self._block_handlers: set[str] = set()  # /dev/sdX nodes whose ioctls pass through to the target
        self._next_scsi_host = 0

    def child_env(self) -> dict[str, str]:
        """Environment for a child process that must see and drive the virtual devices (pyusb, pyudev,
        rpiboot): ``UMOCKDEV_DIR`` is set at C level only, so ``os.environ`` lacks it."""
        return {**os.environ, "UMOCKDEV_DIR": self.root_dir}

    def port(self, path: str, controller: str = "xhci", journal: Journal | None = None) -> UsbPort:
        """The port at ``path`` ("1-1.4": bus 1, root port 1, hub port 4), creating its bus, host
        controller and hubs on first use. ``controller`` is a kind with an optional host profile
        (``"ehci-strict"``; :mod:`hil.virtual.usb.hostprofiles`), lenient unless said otherwise."""
        match = _PORT_PATH.match(path)
        if not match:
            raise InputError(f"USB port path {path!r} is not like '1-1.4'; write BUS-PORT[.PORT...]",
                             stage=STAGE)
        kind_name, profile = controller_spec(controller, tuple(sysfs.CONTROLLERS))
        number, chain = int(match[1]), [int(p) for p in match[2].split(".")]
        kind = sysfs.CONTROLLERS[kind_name]
        limits = [kind.root_ports] + [sysfs.HUB_PORTS] * (len(chain) - 1)
        if not 1 <= number <= 64 or any(not 1 <= p <= limit for p, limit in zip(chain, limits, strict=True)):
            raise InputError(f"USB port path {path!r} is out of range: bus 1-64, root ports "
                             f"1-{kind.root_ports}, hub ports 1-{sysfs.HUB_PORTS}", stage=STAGE)
        with self._lock:
            self._require_open()
            bus = self._bus(number, kind, profile)
            if bus.controller is not kind or bus.profile is not profile:
                raise InputError(f"USB bus {number} already hangs off an {bus.controller.kind}-{bus.profile.name} "
                                 f"controller, not {controller}; give port {path} another bus", stage=STAGE)
            if path not in self._ports:
                hub = f"usb{number}"
                for depth in range(1, len(chain)):
                    name = f"{number}-{'.'.join(map(str, chain[:depth]))}"
                    if name not in bus.hubs:
                        bus.hubs[name] = self._plug(number, hub, name, _hub(0x05E3, 0x0610, 0x0656,
                                                    {1: "GenesysLogic", 2: "USB2.1 Hub"}), None)
                    hub = name
                self._ports[path] = UsbPort(self, path, number, hub, journal)
            port = self._ports[path]
            if journal is not None:
                port.journal = journal
            return port

    def close(self) -> None:
        """Remove every device and the testbed with its temporary folder (at process exit)."""
        with self._lock:
            if self._testbed is None:
                return
            for port in self._ports.values():
                port.detach()
            for bus in self._buses.values():
                for hub in reversed(bus.hubs.values()):
                    self._unplug(hub)
                self._remove_records([sysfs.controller_record(bus.pci_syspath, bus.controller)])
            for node, enumeration in self._handlers.items():
                self._testbed.detach_ioctl(node)
                if enumeration.doorbell is not None:
                    enumeration.doorbell.close()
            self._handlers.clear()
            for name in self._block_handlers:
                self._testbed.detach_ioctl(name)
            testbed, self._testbed = self._testbed, None
            del testbed
            gc.collect()
            shutil.rmtree(self.root_dir, ignore_errors=True)
        with UsbBus._instance_lock:
            if UsbBus._instance is self:
                UsbBus._instance = None
                UsbBus._closed = True

    # -- internals (bus lock held) -------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._testbed is None:
            raise InfrastructureError("the virtual USB bus is closed; call UsbBus.get() for a new one",
                                      stage=STAGE)

    def _bus(self, number: int, kind: sysfs.HostController, profile: HostProfile) -> _Bus:
        bus = self._buses.get(number)
        if bus is not None:
            return bus
        # a fixed address per bus number, whatever order buses appear in: eight buses per PCI slot
        pci = f"/sys/devices/pci0000:00/0000:00:{kind.pci_slot + (number - 1) // 8:02x}.{(number - 1) % 8}"
        for driver in (f"pci/drivers/{kind.driver}", "usb/drivers/usb", "usb/drivers/hub",
                       "usb/drivers/usb-storage", "scsi/drivers/sd"):
            os.makedirs(os.path.join(self.root_dir, "sys/bus", driver), exist_ok=True)
        self._testbed.add_from_string(sysfs.controller_record(pci, kind).text())
        bus = self._buses[number] = _Bus(number, kind, profile, pci)
        release = platform.release()
        version = re.match(r"(\d+)\.(\d+)", release)
        bcd = int(f"{version[1]}{int(version[2]):02d}", 16) if version else 0
        strings = {1: bus.pci_name, 2: kind.product, 3: f"Linux {release} {kind.driver}"}
        root_hub = _hub(0x1D6B, 0x0002, bcd, strings)
        bus.hubs[f"usb{number}"] = self._plug(number, None, f"usb{number}", root_hub, None)
        return bus

    def _syspath_of(self, number: int, name: str) -> str:
        bus = self._buses[number]
        if name.startswith("usb"):
            return f"{bus.pci_syspath}/{name}"
        parent = name.rsplit(".", 1)[0] if "." in name else f"usb{number}"
        return f"{self._syspath_of(number, parent)}/{name}"

    def _devnum(self, bus: _Bus) -> int:
        """The next free device number, round robin from 1 to 127 as Linux allocates them."""
        for _ in range(127):
            devnum, bus.next_devnum = bus.next_devnum, bus.next_devnum % 127 + 1
            if f"/dev/bus/usb/{bus.number:03d}/{devnum:03d}" not in self._handlers:
                return devnum
        raise InfrastructureError(f"USB bus {bus.number} has no free device number", stage=STAGE)

    def _plug(self, number: int, hub: str | None, name: str, model: UsbDeviceModel,
              journal: Journal | None) -> _Enumeration:
        self._retire_idle()
        bus = self._buses[number]
        devpath = "0" if hub is None else name.split("-", 1)[1]
        node = sysfs.UsbNode(self._syspath_of(number, name), name, number, self._devnum(bus), devpath,
                             bus.pci_name, sysfs.effective_speed(model.identity.speed, bus.controller))
        config = sysfs.parse_config(model.identity.config_descriptors[0])
        drivers = {i.number: _DRIVERS[i.cls] for i in config.interfaces if i.cls in _DRIVERS}
        admission = bus.profile.admit(node.speed, model.identity.config_descriptors)
        enumeration = _Enumeration(node, model, bus.controller, drivers, journal, admission)
        for line in admission.warnings:  # what the kernel would print in dmesg
            log.warning("usb %s: %s", name, line)
            enumeration.record("kernel", message=line)
        if admission.refusal is not None:
            log.warning("usb %s: %s-%s controller: %s", name, bus.controller.kind, bus.profile.name,
                        admission.reason)
            enumeration.record("refused", controller=f"{bus.controller.kind}-{bus.profile.name}",
                               reason=admission.reason)
        handler = UMockdev.IoctlBase()
        handler.connect("handle-ioctl", enumeration.on_ioctl)
        handler.connect("client-vanished", enumeration.on_vanished)
        self._testbed.attach_ioctl(node.devname, handler)
        self._handlers[node.devname] = enumeration
        enumeration.doorbell = _Doorbell(self.root_dir + node.devname)
        identity = model.identity
        is_hub = identity.device_descriptor[4] == 9
        maxchild = (bus.controller.root_ports if hub is None else sysfs.HUB_PORTS) if is_hub else 0
        enumeration.records = sysfs.device_records(node, identity.device_descriptor,
                                                   identity.config_descriptors, identity.strings, drivers, maxchild)
        # umockdev aborts the whole process when asked to add a device that exists: clear what an unplug
        # that failed half-way (in a device thread, where nobody saw the error) may have left behind.
        stale = [r for r in enumeration.records if os.path.exists(self.root_dir + r.syspath)]
        if stale:
            log.warning("usb %s: removing %d stale sysfs entries before enumerating", name, len(stale))
            self._remove_records(stale)
        self._testbed.add_from_string("\n".join(r.text() for r in enumeration.records))
        return enumeration

    def _unplug(self, enumeration: _Enumeration) -> None:
        try:
            enumeration.unplug()
            for _, disk, records in reversed(enumeration.disks):
                self._remove_disk(disk, records)
            enumeration.disks.clear()
        finally:  # the device must leave sysfs whatever else failed, or its port can never be used again
            self._remove_records(enumeration.records + enumeration.scsi_host)
            self._retire_idle()

    def _remove_records(self, records: list[sysfs.Record]) -> None:
        """Children first; umockdev 0.17.16's remove_device() sends no "remove" uevent itself."""
        for record in reversed(records):
            self._testbed.uevent(record.syspath, "remove")
            self._testbed.remove_device(record.syspath)

    def _retire_idle(self) -> None:
        """Drop ioctl handlers of unplugged devices that no host holds open any more."""
        for node, enumeration in list(self._handlers.items()):
            if enumeration.idle:
                self._testbed.detach_ioctl(node)
                del self._handlers[node]
                if enumeration.doorbell is not None:
                    enumeration.doorbell.close()

    # -- disks ---------------------------------------------------------------------------------------------

    def _set_disks(self, enumeration: _Enumeration, disks: tuple[BlockChild, ...]) -> None:
        storage = [n for n, driver in enumeration.drivers.items() if driver == "usb-storage"]
        if disks and not storage:
            raise InfrastructureError(f"USB device on {enumeration.node.name} has disks but no mass-storage "
                                      "interface (class 8) to hang them on", stage=STAGE)
        current = enumeration.disks
        for lun in range(max(len(current), len(disks))):
            old = current[lun] if lun < len(current) else None
            new = disks[lun] if lun < len(disks) else None
            same_disk = old is not None and new is not None and (old[0].vendor, old[0].model) == (
                new.vendor, new.model)
            if same_disk:
                assert old is not None and new is not None
                if old[0] != new:
                    self._change_disk(old[1], old[0], new)
                    current[lun] = (new, old[1], old[2])
                continue
            if old is not None:
                self._remove_disk(old[1], old[2])
            if new is not None:
                entry = self._add_disk(enumeration, storage[0], lun, new)
                if lun < len(current):
                    current[lun] = entry
                else:
                    current.append(entry)
        del current[len(disks):]

    def _add_disk(self, enumeration: _Enumeration, interface: int, lun: int,
                  disk: BlockChild) -> tuple[BlockChild, sysfs.DiskNode, list[sysfs.Record]]:
        node = enumeration.node
        interface_syspath = f"{node.syspath}/{node.name}:{enumeration.config.value}.{interface}"
        if enumeration.scsi_host_number < 0:
            enumeration.scsi_host_number = self._next_scsi_host
            self._next_scsi_host += 1
        index = next(i for i in range(702) if _sd_name(i) not in self._sd_names
                     and not os.path.lexists(os.path.join(self.root_dir, "dev", _sd_name(i))))
        interface_id = f"{node.id_path}:{enumeration.config.value}.{interface}"
        disk_node = sysfs.DiskNode(interface_syspath, interface_id, enumeration.scsi_host_number, lun,
                                   _sd_name(index), index)
        records = sysfs.disk_records(disk_node, disk.vendor, disk.model, disk.size,
                                     enumeration.records[0].properties)
        added = records
        if not enumeration.scsi_host:
            enumeration.scsi_host = sysfs.scsi_host_records(disk_node)
            added = enumeration.scsi_host + records
        self._disk_node(disk_node, disk.target)
        self._pass_block_ioctls(disk_node.devname)
        self._sd_names.add(disk_node.name)
        self._testbed.add_from_string("\n".join(r.text() for r in added))
        enumeration.record("disk", name=disk_node.devname, target=disk.target, size=disk.size)
        return disk, disk_node, records

    def _pass_block_ioctls(self, devname: str) -> None:
        """Let block ioctls (BLKGETSIZE64, BLKFLSBUF, ...) on ``/dev/sdX`` reach the target: umockdev
        answers ioctls on testbed nodes without a handler with ENOTTY. Kept until close, because a host
        may hold the node open past a detach and umockdev aborts a client whose handler went away."""
        if devname not in self._block_handlers:
            handler = UMockdev.IoctlBase()
            handler.connect("handle-ioctl", _pass_through)
            self._testbed.attach_ioctl(devname, handler)
            self._block_handlers.add(devname)

    def _change_disk(self, node: sysfs.DiskNode, old: BlockChild, new: BlockChild) -> None:
        if new.target != old.target:
            self._disk_node(node, new.target)
        self._testbed.set_attribute(node.block_syspath, "size", f"{new.size // 512}\n")
        self._testbed.uevent(node.block_syspath, "change")

    def _remove_disk(self, node: sysfs.DiskNode, records: list[sysfs.Record]) -> None:
        self._remove_records(records)
        # remove_device() leaves the /sys/block link behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root_dir, "sys/block", node.name))
        self._sd_names.discard(node.name)

    def _disk_node(self, node: sysfs.DiskNode, target: str) -> None:
        """``/dev/sdX`` in the testbed reaches ``target``: a block node with the target's numbers when it is
        a block device (so stat() says block device, as for a real disk), else a symlink."""
        path = os.path.join(self.root_dir, "dev", node.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        try:
            info = os.stat(target)
        except OSError as e:
            raise InfrastructureError(f"disk {node.name} should reach {target}, which cannot be used: {e}",
                                      stage=STAGE) from e
        if stat.S_ISBLK(info.st_mode):
            try:
                os.mknod(path, stat.S_IFBLK | 0o660, info.st_rdev)
                os.chmod(path, 0o660 | stat.S_ISVTX)  # umockdev's mark for "block device" in stat()
                return
            except PermissionError:
                pass  # not root: a symlink still reaches the data
        os.symlink(target, path)


def _pass_through(_handler: Any, ic: Any) -> bool:
    result, code = ic.execute()
    ic.complete(result, code)
    return True


def _sd_name(index: int) -> str:
    """sda .. sdz, sdaa .. sdzz, as the sd driver names disks."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "sd" + (letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26])
