"""One device model served through Linux gadgetfs on a dummy_hcd bus: the kernel transport's ROM and second
stages. The kernel's own host stack (usbcore, usbfs, usbmon) sees it as it sees hardware.

gadgetfs (drivers/usb/gadget/legacy/inode.c) answers GET_DESCRIPTOR for the device and configuration itself and
hands every other control request to user space as a SETUP event on ep0: an IN request is answered by writing
its data, an OUT one acknowledged by reading its data stage, and either is stalled by I/O in the wrong
direction. Bulk endpoints are files that are read and written one transfer at a time.

What a gadget cannot say here, as hardware would not either: a device only receives what it has armed its OUT
endpoint for, so bulk data beyond an announced length is NAKed until the host's timeout rather than seen and
stalled; an OUT control request's data stage is acknowledged before the model sees it, so it cannot stall it;
gadgetfs reports ``bcdUSB`` 2.00 whatever the model says, and one gadgetfs device exists at a time (the first
dummy_hcd bus), so only the rig's own port carries a ROM or second stage.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import struct
import threading
import time
from pathlib import Path

from hil.virtual.usb.device import Cancelled, ControlSetup, DeviceGone, Stall, Unresponsive, UsbDeviceModel

log = logging.getLogger(__name__)
GADGETFS = Path("/dev/gadget")
EVENT = struct.Struct("<8sI")  # struct usb_gadgetfs_event: the setup packet, then the event type
NOP, CONNECT, DISCONNECT, SETUP, SUSPEND = range(5)
DT_DEVICE, DT_CONFIG, DT_ENDPOINT = 1, 2, 5
SET_CONFIGURATION = 9
CHUNK = 64 * 1024  # bytes asked of an OUT endpoint at once, at most
POLL = 0.002  # s between looks at a model that has not armed its OUT endpoint yet


def endpoints(config: bytes) -> list[bytes]:
    """The 7-byte endpoint descriptors of a configuration descriptor, in order."""
    found, i = [], 0
    while i + 2 <= len(config) and config[i] >= 2:
        if config[i + 1] == DT_ENDPOINT:
            found.append(bytes(config[i:i + 7]))
        i += config[i]
    return found


def full_speed_config(config: bytes) -> bytes:
    """The configuration as a full-speed host must see it: bulk endpoints of 64 bytes."""
    out, i = bytearray(config), 0
    while i + 2 <= len(out) and out[i] >= 2:
        if out[i + 1] == DT_ENDPOINT and out[i + 3] & 3 == 2:
            out[i + 4:i + 6] = min(64, int.from_bytes(out[i + 4:i + 6], "little")).to_bytes(2, "little")
        i += out[i]
    return bytes(out)


def endpoint_file(folder: Path, address: int) -> Path:
    """dummy_hcd names its endpoints ``ep<number><in|out>[-type]``; the descriptor's address picks one."""
    prefix = f"ep{address & 0x0F}{'in' if address & 0x80 else 'out'}"
    for path in sorted(folder.iterdir()):
        if path.name == prefix or path.name.startswith(prefix + "-"):
            return path
    raise OSError(errno.ENOENT, f"the gadget has no endpoint {prefix}", str(folder))


class GadgetFsDevice:
    """``model`` on the bus from :meth:`start` until :meth:`stop` (the host sees a connect and a disconnect)."""

    def __init__(self, model: UsbDeviceModel, folder: Path = GADGETFS):
        self.model = model
        self.folder = folder
        self.identity = model.identity
        self.high_speed = self.identity.speed != "full"
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._ep0 = -1
        self._threads: list[threading.Thread] = []
        self._ep_fds: list[int] = []
        self._configured = False

    def start(self) -> None:
        udc = next((p for p in sorted(self.folder.iterdir()) if not p.name.startswith("ep")), None)
        if udc is None:
            raise OSError(errno.ENODEV, "no USB device controller in gadgetfs (is dummy_hcd loaded?)", str(self.folder))
        config = self.identity.config_descriptors[0]
        head = struct.pack("<I", 0) + full_speed_config(config)
        if self.high_speed:
            head += config  # with no high-speed configuration gadgetfs connects at full speed only
        self._ep0 = os.open(udc, os.O_RDWR)
        try:
            os.write(self._ep0, head + self.identity.device_descriptor)
        except OSError:
            os.close(self._ep0)
            raise
        self._spawn(self._ep0_loop, "gadgetfs-ep0")

    def stop(self) -> None:
        """Leave the bus: transfers in flight end, the host sees the device go."""
        self._stop.set()
        self._cancel.set()
        for thread in self._threads:
            thread.join(5)
        for fd in self._ep_fds:
            os.close(fd)
        self._ep_fds.clear()

    # --- ep0 ----------------------------------------------------------------------------------------

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _ep0_loop(self) -> None:
        poller = select.poll()
        poller.register(self._ep0, select.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                try:
                    data = os.read(self._ep0, EVENT.size * 5)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    log.debug("gadgetfs ep0 read: %s", e)
                    return
                for i in range(0, len(data) - EVENT.size + 1, EVENT.size):
                    raw, kind = EVENT.unpack_from(data, i)
                    if kind == SETUP:
                        self._setup(ControlSetup(*struct.unpack("<BBHHH", raw)))
                    elif kind == DISCONNECT:
                        self._cancel.set()
        finally:
            os.close(self._ep0)  # unbinds the gadget: the host sees the disconnect, endpoint I/O ends

    def _setup(self, setup: ControlSetup) -> None:
        if setup.is_standard and setup.bRequest == SET_CONFIGURATION and not setup.is_in:
            if setup.wValue and not self._configured:
                self._configure()
            self._ack_out()
            return
        try:
            data = b""
            if not setup.is_in and setup.wLength:
                data = os.read(self._ep0, setup.wLength)  # the data stage; gadgetfs acknowledges it
            reply = self.model.control(setup, data, self._cancel)
        except Stall as e:
            import sys; print(f"DEBUG stall {setup} {e}", file=sys.stderr)
            self._stall(setup)
            return
        except (Unresponsive, Cancelled) as e:
            import sys; print(f"DEBUG noanswer {setup} {e!r}", file=sys.stderr)
            return  # no answer: the host's transfer times out
        except DeviceGone:
            self._stop.set()
            return
        except OSError as e:
            log.debug("gadgetfs ep0 data stage: %s", e)
            return
        try:
            import sys; print(f"DEBUG reply {setup} {len(reply)}", file=sys.stderr)
            if setup.is_in:
                os.write(self._ep0, reply[:setup.wLength])
            elif not setup.wLength:
                self._ack_out()
        except OSError as e:
            log.debug("gadgetfs ep0 reply: %s", e)

    def _ack_out(self) -> None:
        try:
            os.read(self._ep0, 0)
        except OSError as e:
            log.debug("gadgetfs ep0 status: %s", e)

    def _stall(self, setup: ControlSetup) -> None:
        try:
            if setup.is_in:
                os.read(self._ep0, 0)
            else:
                os.write(self._ep0, b"")
        except OSError:
            pass  # EL2HLT: the stall was sent

    # --- bulk ---------------------------------------------------------------------------------------

    def _configure(self) -> None:
        self._configured = True
        config = self.identity.config_descriptors[0]
        full = full_speed_config(config)
        for fs_desc, hs_desc in zip(endpoints(full), endpoints(config), strict=True):
            address = fs_desc[2]
            fd = os.open(endpoint_file(self.folder, address), os.O_RDWR)
            os.write(fd, struct.pack("<I", 1) + fs_desc + (hs_desc if self.high_speed else b""))
            self._ep_fds.append(fd)
            if address & 0x80:
                self._spawn(self._in_loop, f"gadgetfs-ep{address:02x}", fd, address)
            else:
                self._spawn(self._out_loop, f"gadgetfs-ep{address:02x}", fd, address)

    def _out_loop(self, fd: int, address: int) -> None:
        pending = getattr(self.model, "out_pending", None)
        while not self._stop.is_set():
            want = pending(address) if pending is not None else 64
            if want <= 0:
                time.sleep(POLL)
                continue
            try:
                data = os.read(fd, min(want, CHUNK))
            except OSError as e:
                log.debug("gadgetfs ep%02x read: %s", address, e)
                return
            try:
                self.model.bulk_out(address, data, self._cancel)
            except (Unresponsive, Stall):
                return  # stops taking data: the host's next transfer is NAKed until its timeout
            except (DeviceGone, Cancelled):
                self._stop.set()
                return

    def _in_loop(self, fd: int, address: int) -> None:
        while not self._stop.is_set():
            try:
                data = self.model.bulk_in(address, CHUNK, self._cancel)
            except Unresponsive:
                time.sleep(0.05)
                continue
            except Stall:
                with contextlib.suppress(OSError):
                    os.read(fd, 0)  # wrong-direction I/O halts the endpoint
                return
            except (DeviceGone, Cancelled):
                return
            try:
                os.write(fd, data)
            except OSError as e:
                log.debug("gadgetfs ep%02x write: %s", address, e)
                return
