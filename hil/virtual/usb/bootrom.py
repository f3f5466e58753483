"""The Broadcom boot ROM in USB device-boot mode (usbboot-protocol.md sections 2, 3 and 10.2).

The host announces each write with a zero-length control OUT (0x40, bRequest 0, length in
wValue | wIndex << 16), then sends exactly that many bytes of bulk OUT: first the 24-byte boot message
(LE int32 length + 20 signature bytes), then the second stage. A 4-byte control IN (0xC0) returns the
int32 status. On status 0 the ROM leaves the bus and the second stage starts.

How this model treats a wrong exchange (the real ROM's error codes are undocumented, so the non-zero
codes below are ours): the ROM never crashes and never boots anything it did not fully receive. It
answers the status read with a non-zero code, stays on the bus and waits for a fresh exchange, which
is what lets rpiboot's endless retry loop succeed on the next pass.

* bulk data with nothing announced: never answered (NAK until the host's timeout);
* more bulk data than announced, or a status read with wLength != 4: STALL;
* a boot message announced with a length other than 24, or an image announce that differs from the
  message's length field: status :data:`STATUS_BAD_EXCHANGE` (a big-endian length is accepted and noted);
* a new announce in the middle of an exchange abandons it (journal "fault") and starts over;
* an empty second stage (length 0): status :data:`STATUS_NO_IMAGE`;
* an image that is neither a stand-in second stage nor a genuine Raspberry Pi one
  (:mod:`hil.virtual.usb.genuine`) for this chip, or a genuine one of a kind not modelled: status
  :data:`STATUS_REJECTED`. A genuine second stage runs as the program it is (msd, gadget, recovery);
* a status read before the exchange is complete: never answered.

Two switches rehearse the marginal hosts of usbboot's tracker: ``rom_failed_exchanges`` leaves the first N
boot-message announces unanswered (``Failed control transfer (-7,24)``, usbboot #87), and ``rom_odd_status``
answers a status that is not 0 yet boots (a guess: rpiboot ignores the status, main.c:651-663, 1109).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from hil.virtual.usb import genuine
from hil.virtual.usb.descriptors import rom_descriptors
from hil.virtual.usb.device import ControlSetup, DeviceGone, Stall, Unresponsive
from hil.virtual.usb.payloads import PROGRAMS, StandIn, read_stand_in
from hil.virtual.usb.switches import DeviceEnv, VendorControl

BOOT_MESSAGE_SIZE = 24
STATUS_OK = 0
STATUS_BAD_EXCHANGE = 0x8000_0001
STATUS_NO_IMAGE = 0x8000_0002
STATUS_REJECTED = 0x8000_0003


@dataclass(frozen=True)
class RomResult:
    """How the ROM left the bus: with a second stage to run, or dropped off mid-download."""

    program: StandIn | None
    disconnected: bool = False


class BootRom:
    """One enumeration of the ROM. Transfers arrive on transport threads; the orchestrator waits in
    :meth:`wait_result`."""

    def __init__(self, env: DeviceEnv):
        self.env = env
        sw = env.switches
        self.descriptors = rom_descriptors(env.model, env.serial, config_55_32=sw.config_55_32,
                                           full_speed=sw.full_speed)
        self.identity = self.descriptors.identity()
        self._ep0 = VendorControl(self.descriptors, env, "rom")
        self._cond = threading.Condition()
        self._result: RomResult | None = None
        self._reset()

    def _reset(self) -> None:
        self._phase = "message"  # message -> image -> status, or error
        self._remaining = 0
        self._buf = bytearray()
        self._length = 0
        self._status = STATUS_OK
        self._program: StandIn | None = None
        self._image_received = 0

    def _fault(self, what: str, **details: object) -> None:
        self.env.journal.record("fault", what, stage="rom", **details)

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        self._check_present()
        reply = self._ep0.screen(setup, data)
        if reply is not None:
            return reply
        with self._cond:
            if self._result is not None:  # on its way off the bus: the double sighting
                raise Unresponsive("boot ROM is leaving the bus")
            if setup.is_in:
                return self._status_read(setup)
            if data:
                raise Stall("announce carries no data stage")
            if self._phase == "message" and not self._remaining and self.env.fail_exchange():
                raise Unresponsive("boot message announce not answered")
            self._announce(setup.wValue | setup.wIndex << 16)
            return b""

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        self._check_present()
        if endpoint not in self.descriptors.bulk_out:
            raise Stall(f"no bulk OUT endpoint {endpoint:#x}")
        with self._cond:
            if self._result is not None:
                raise Unresponsive("boot ROM is leaving the bus")
            if not self._remaining:
                self._fault("bulk without announce", bytes=len(data))
                raise Unresponsive("no transfer announced")
            if len(data) > self._remaining:
                self._fault("bulk longer than announced", bytes=len(data), announced_left=self._remaining)
                self._phase, self._remaining = "error", 0
                raise Stall("more data than announced")
            if not self.env.take_bulk(len(data)):
                self._fault("truncated_bulk", received=self.env.bulk_received)
                raise Unresponsive("device stopped accepting bulk data")
            self._disconnect_if_due(len(data))
            self._buf += data
            self._remaining -= len(data)
            if self._phase == "image":
                self._image_received += len(data)
            if not self._remaining:
                self._complete()
            return len(data)

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        raise Unresponsive("the boot ROM never sends bulk data")

    def out_pending(self, endpoint: int) -> int:
        """Bytes the ROM has armed its OUT endpoint for (what is announced and not yet received): a gadget
        transport reads exactly that, as the ROM's USB block does."""
        with self._cond:
            return self._remaining if endpoint in self.descriptors.bulk_out and self._result is None else 0

    def wait_result(self) -> RomResult | None:
        """Block until the ROM leaves the bus; None when power was cut first."""
        with self._cond:
            while self._result is None and not self.env.power_cut.is_set():
                self._cond.wait(0.05)
            return self._result

    def _check_present(self) -> None:
        self.env.check_power()
        if self._result is not None and self._result.disconnected:
            raise DeviceGone("dropped off the bus")

    def _disconnect_if_due(self, n: int) -> None:
        at = self.env.switches.disconnect_at
        if at is None or self._phase != "image" or self.env.disconnect_fired:
            return
        if self._image_received + n <= at:
            return
        self.env.disconnect_fired = True
        self.env.journal.record("fault", "disconnect_at", stage="rom", received=self._image_received, at=at)
        self._result = RomResult(None, disconnected=True)
        self._cond.notify_all()
        raise DeviceGone("device left the bus during the download")

    def _announce(self, n: int) -> None:
        if self._remaining or self._phase == "status":
            self._fault("exchange restarted", phase=self._phase, left=self._remaining, announced=n)
        if self._remaining or self._phase in ("status", "error"):
            self._reset()
        if self._phase == "message":
            if n != BOOT_MESSAGE_SIZE:
                self._fault("boot message length", announced=n, expected=BOOT_MESSAGE_SIZE)
                self._phase = "error"
                return
            self._remaining = n
            return
        if n != self._length:
            big_endian = struct.unpack(">i", struct.pack("<i", self._length))[0]
            if n != big_endian:
                self._fault("image length differs from boot message", announced=n, message=self._length)
                self._phase = "error"
                return
            self._fault("big-endian length in boot message", length=n)
            self._length = n
        self._remaining = n
        if not n:
            self._complete()

    def _complete(self) -> None:
        data, self._buf = bytes(self._buf), bytearray()
        if self._phase == "message":
            self._length = struct.unpack_from("<i", data)[0]
            self.env.journal.record("bulk", "boot-message", bytes=len(data), length=self._length,
                                    signed=any(data[4:]))
            self._phase = "image"
            return
        name = self.env.model.second_stage
        self.env.journal.record("bulk", name, bytes=len(data))
        self._phase, self._status = "status", self._judge(name, data)

    def _judge(self, name: str, image: bytes) -> int:
        if self.env.switches.rom_status:
            self._fault("rom_status", status=self.env.switches.rom_status)
            return self.env.switches.rom_status
        if not image:
            self._fault("empty second stage", file=name)
            return STATUS_NO_IMAGE
        program = read_stand_in(image) or genuine.second_stage(image)
        chip = self.env.model.chip_dir
        if program is None:
            self._fault("not a second stage", file=name,
                        reason="neither a stand-in (payloads.make_payload) nor shaped like Raspberry Pi's own")
            return STATUS_REJECTED
        if program.genuine and program.program not in PROGRAMS:
            self._fault("a Raspberry Pi second stage of a kind not modelled", file=name, chip=program.chip,
                        reason="the virtual module runs msd, mass-storage-gadget64 and recovery second stages")
            return STATUS_REJECTED
        if program.chip != chip or program.program not in PROGRAMS:
            self._fault("second stage for another chip", file=name, chip=chip,
                        made_for=f"{program.chip}/{program.program}")
            return STATUS_REJECTED
        if program.genuine:
            self.env.journal.record("stage", "genuine second stage", file=name, chip=program.chip,
                                    program=program.program)
        self._program = program
        return STATUS_OK

    def _status_read(self, setup: ControlSetup) -> bytes:
        if setup.wLength != 4:
            self._fault("status read length", wLength=setup.wLength)
            raise Stall("the status is 4 bytes")
        if self._phase == "error":
            self._reset()
            self.env.journal.record("stage", "rom-status", status=STATUS_BAD_EXCHANGE)
            return struct.pack("<I", STATUS_BAD_EXCHANGE)
        if self._phase != "status":
            raise Unresponsive("nothing to report yet")
        status, program = self._status, self._program
        self._reset()
        if status == STATUS_OK:
            self._result = RomResult(program)
            self._cond.notify_all()
            if self.env.switches.rom_odd_status:
                status = self.env.switches.rom_odd_status
                self._fault("rom_odd_status", status=status)
        self.env.journal.record("stage", "rom-status", status=status)
        return struct.pack("<I", status)
