"""One device model on the virtual bus between attach and detach: its sysfs records and its usbfs ioctls.

Every usbfs ioctl a host issues on the device node is answered here (on umockdev's worker thread) and
turned into calls on a :class:`UsbDeviceModel`, each run on a worker thread per endpoint.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

from hil.virtual.journal import Journal
from hil.virtual.usb import sysfs, usbfs
from hil.virtual.usb.descriptors import CLEAR_FEATURE, SET_CONFIGURATION, SET_INTERFACE
from hil.virtual.usb.device import (
    BlockChild,
    Cancelled,
    ControlSetup,
    DeviceGone,
    Stall,
    Unresponsive,
    UsbDeviceModel,
)
from hil.virtual.usb.doorbell import Doorbell
from hil.virtual.usb.hostprofiles import Admission
from hil.virtual.usb.urbs import DEFERRED, Call, Client, EndpointWorker, Errno, Outcome, Urb, in_outcome

log = logging.getLogger(__name__)
DRIVERS = {8: "usb-storage", 9: "hub"}  # the kernel drivers that bind interfaces of these classes


class Enumeration:
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
        self.doorbell: Doorbell | None = None
        self.gone = False
        self._caps = controller.usbfs_caps
        self._interfaces = {i.number: i for i in self.config.interfaces}
        self._ep_interface = {ep: i.number for i in self.config.interfaces for ep in i.endpoints}
        self._lock = threading.Lock()
        self._unplugged = threading.Event()
        self._clients: dict[Any, Client] = {}
        self._claims: dict[int, Client] = {}
        self._workers: dict[int, EndpointWorker] = {}
        self._handlers: dict[int, Callable[[Client, Any], Any]] = {
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
            self._sweep()
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
                client = self._clients.get(ic)
                if client is None:
                    self._sweep()
                    client = self._clients[ic] = Client(ic)
                if handler is None:
                    log.debug("%s: unhandled usbfs ioctl %#x", self.node.name, request)
                    raise Errno(errno.ENOTTY)
                if self.gone and request not in (usbfs.REAPURB, usbfs.REAPURBNDELAY, usbfs.DISCARDURB):
                    raise Errno(errno.ENODEV)
                result = handler(client, ic)
        except Errno as e:
            ic.complete(-1, e.code)
        except Exception:
            log.exception("%s: usbfs %s failed", self.node.name, usbfs.NAMES.get(request, hex(request)))
            ic.complete(-1, errno.EIO)
        else:
            if result is not DEFERRED:
                ic.complete(result, 0)
        return True

    def on_vanished(self, _handler: Any, ic: Any) -> None:
        with self._lock:
            client = self._clients.get(ic)
            if client is not None:
                self._closed(client)
            self._ring()

    def _sweep(self) -> None:
        """Lock held: end the clients whose file descriptor is closed.

        Linux usbfs kills a file's URBs and releases its claims when the file is closed, so a new handle
        may claim what a handle closed without releasing held (rpiboot's retry does exactly that). umockdev
        0.17.16 never emits ``client-vanished``; a closed client shows only as ``connected`` turning false,
        so the bus looks whenever that can matter: a new client, a claim, the question whether it is idle."""
        for client in [c for c in self._clients.values() if not c.ioctl.props.connected]:
            self._closed(client)

    def _closed(self, client: Client) -> None:
        del self._clients[client.ioctl]
        client.parked = False
        for urb in client.urbs.values():
            urb.status = -errno.ENOENT
            urb.cancel.set()
        released = sorted(n for n in client.claimed if self._claims.get(n) is client)
        for number in released:
            del self._claims[number]
        client.claimed.clear()
        if released:
            self.record("closed", released=released)

    # -- URBs ----------------------------------------------------------------------------------------------

    def _submit(self, c: Client, ic: Any) -> int:
        urb_data = ic.get_arg().resolve(0, usbfs.URB_SIZE)
        info = usbfs.Urb.parse(bytes(urb_data.retrieve()))
        urb = Urb(c, urb_data.client_addr, info, threading.Event())
        call: Call
        if info.type == usbfs.URB_TYPE_CONTROL:
            if info.buffer_length < usbfs.SETUP_SIZE:
                raise Errno(errno.EINVAL)
            raw = bytes(urb_data.resolve(usbfs.URB_BUFFER_OFFSET, info.buffer_length).retrieve())
            setup = ControlSetup(*struct.unpack("<BBHHH", raw[: usbfs.SETUP_SIZE]))
            if setup.wLength > info.buffer_length - usbfs.SETUP_SIZE:
                raise Errno(errno.EINVAL)
            data = b"" if setup.is_in else raw[usbfs.SETUP_SIZE : usbfs.SETUP_SIZE + setup.wLength]
            call = self._control_call(setup, data, info.flags)
            key = 0
        elif info.type in (usbfs.URB_TYPE_BULK, usbfs.URB_TYPE_INTERRUPT):
            number = self._ep_interface.get(info.endpoint)
            if number is None:
                raise Errno(errno.ENOENT)
            self._claim(c, number)  # usbfs claims the interface implicitly, as checkintf() does
            call = self._bulk_call(urb_data, info)
            key = info.endpoint
        else:
            raise Errno(errno.EINVAL)  # isochronous transfers are not modelled
        if self.admission.refusal is not None:
            call = self._refused
        c.urbs[urb.addr] = urb
        self._worker(key).put(lambda: self._run(urb, call))
        return 0

    def _refused(self, cancel: threading.Event) -> Outcome:
        """The host profile refused the device: its controller ends each transfer with a transaction error."""
        assert self.admission.refusal is not None
        self.record("refused transfer", errno=errno.errorcode[self.admission.refusal])
        if self.admission.refusal == errno.ETIMEDOUT:  # no handshake at all: the host's own timeout ends it
            raise Unresponsive("the controller never completes a transfer to this device")
        return -self.admission.refusal, b"", 0

    def _control_call(self, setup: ControlSetup, data: bytes, flags: int) -> Call:
        def call(cancel: threading.Event) -> Outcome:
            reply = self.model.control(setup, data, cancel)
            return in_outcome(reply, setup.wLength, flags) if setup.is_in else (0, b"", setup.wLength)

        return call

    def _bulk_call(self, urb_data: Any, info: usbfs.Urb) -> Call:
        if info.is_in:
            return lambda cancel: in_outcome(
                self.model.bulk_in(info.endpoint, info.buffer_length, cancel), info.buffer_length, info.flags)
        data = (bytes(urb_data.resolve(usbfs.URB_BUFFER_OFFSET, info.buffer_length).retrieve())
                if info.buffer_length else b"")

        def call(cancel: threading.Event) -> Outcome:
            accepted = self.model.bulk_out(info.endpoint, data, cancel)
            return 0, b"", max(0, min(accepted, len(data)))

        return call

    def _run(self, urb: Urb, call: Call) -> None:
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

    def _complete(self, urb: Urb, status: int, data: bytes = b"", actual: int = 0) -> None:
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

    def _deliver(self, ic: Any, urb: Urb) -> None:
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

    def _reap(self, c: Client, ic: Any) -> object:
        if c.done:
            urb = c.done.popleft()
            self._ring()
            self._deliver(ic, urb)
            return 0
        if self.gone:
            raise Errno(errno.ENODEV)
        if ic.get_request() & 0xFFFFFFFF == usbfs.REAPURBNDELAY:
            raise Errno(errno.EAGAIN)
        c.parked = True
        return DEFERRED

    def _discard(self, c: Client, ic: Any) -> int:
        urb = c.urbs.get(int.from_bytes(bytes(ic.get_arg().retrieve())[:8], "little"))
        if urb is None:
            raise Errno(errno.EINVAL)  # already completed: libusb then reaps it normally
        urb.cancel.set()
        self._complete(urb, -errno.ENOENT)
        return 0

    # -- device and interface state -------------------------------------------------------------------

    def _arg_u32(self, ic: Any, size: int = 4, offset: int = 0) -> int:
        return usbfs.u32(bytes(ic.get_arg().resolve(0, size).retrieve()), offset)

    def _capabilities(self, c: Client, ic: Any) -> int:
        ic.get_arg().resolve(0, 4).update(0, self._caps.to_bytes(4, "little"))
        return 0

    def _connectinfo(self, c: Client, ic: Any) -> int:
        ic.get_arg().resolve(0, 8).update(0, struct.pack("<IB3x", self.node.devnum, self.node.speed == "low"))
        return 0

    def _claim(self, c: Client, number: int) -> None:
        if number not in self._interfaces:
            raise Errno(errno.ENOENT)
        holder = self._claims.get(number)
        if holder is not None and holder is not c and not holder.ioctl.props.connected:
            self._sweep()
            holder = self._claims.get(number)
        if number in self.drivers or (holder is not None and holder is not c):
            raise Errno(errno.EBUSY)
        self._claims[number] = c
        c.claimed.add(number)

    def _claim_ioctl(self, c: Client, ic: Any) -> int:
        self._claim(c, self._arg_u32(ic))
        return 0

    def _release(self, c: Client, ic: Any) -> int:
        number = self._arg_u32(ic)
        if self._claims.get(number) is not c:
            raise Errno(errno.EINVAL)
        del self._claims[number]
        c.claimed.discard(number)
        return 0

    def _getdriver(self, c: Client, ic: Any) -> int:
        arg = ic.get_arg().resolve(0, 260)
        driver = self.drivers.get(usbfs.u32(bytes(arg.retrieve())))
        if driver is None:
            raise Errno(errno.ENODATA)
        arg.update(4, driver.encode() + b"\0")
        return 0

    def _disconnect_claim(self, c: Client, ic: Any) -> int:
        number = self._arg_u32(ic, 264)
        if number in self.drivers:
            raise Errno(errno.EBUSY)  # unbinding the virtual kernel driver is not modelled
        self._claim(c, number)
        return 0

    def _driver_ioctl(self, c: Client, ic: Any) -> int:
        raw = bytes(ic.get_arg().resolve(0, 16).retrieve())
        number, code = struct.unpack_from("<iI", raw)
        if code == usbfs.CONNECT:
            return 0
        if code != usbfs.DISCONNECT:
            raise Errno(errno.ENOTTY)
        raise Errno(errno.EBUSY if number in self.drivers else errno.ENODATA)

    def _set_interface(self, c: Client, ic: Any) -> object:
        number, alternate = struct.unpack("<II", bytes(ic.get_arg().resolve(0, 8).retrieve()))
        self._claim(c, number)
        interface = self._interfaces[number]
        if alternate not in interface.alternates:
            raise Errno(errno.EINVAL)
        self.record("set_interface", interface=number, alternate=alternate)
        # Linux accepts a stall when the interface has only the one setting (usb_set_interface)
        return self._standard(ic, ControlSetup(0x01, SET_INTERFACE, alternate, number, 0),
                              stall_ok=len(interface.alternates) == 1)

    def _set_configuration(self, c: Client, ic: Any) -> object:
        value = self._arg_u32(ic)
        if value != self.config.value:
            log.warning("%s: host asked for configuration %d; only %d is modelled",
                        self.node.name, value, self.config.value)
            raise Errno(errno.EINVAL)
        self.record("set_configuration", value=value)
        return self._standard(ic, ControlSetup(0x00, SET_CONFIGURATION, value, 0, 0))

    def _clear_halt(self, c: Client, ic: Any) -> object:
        endpoint = self._arg_u32(ic)
        number = self._ep_interface.get(endpoint)
        if number is None:
            raise Errno(errno.ENOENT)
        self._claim(c, number)
        self.record("clear_halt", endpoint=endpoint)
        return self._standard(ic, ControlSetup(0x02, CLEAR_FEATURE, 0, endpoint, 0))

    def _reset(self, c: Client, ic: Any) -> int:
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
                    raise Errno(self.admission.refusal)
                self.model.control(setup, b"", self._unplugged)
            except Stall:
                result = (0, 0) if stall_ok else (-1, errno.EPIPE)
            except (DeviceGone, Cancelled):
                result = (-1, errno.ENODEV)
            except Errno as e:
                result = (-1, e.code)
            except Unresponsive:
                result = (-1, errno.ETIMEDOUT)
            except Exception:
                log.exception("%s: model failed on a standard request", self.node.name)
                result = (-1, errno.EPROTO)
            ic.complete(*result)

        self._worker(0).put(job)
        return DEFERRED

    def _worker(self, endpoint: int) -> EndpointWorker:
        worker = self._workers.get(endpoint)
        if worker is None:
            worker = self._workers[endpoint] = EndpointWorker(f"usb {self.node.name} ep{endpoint:#04x}")
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
