"""The USB device boot ("rpiboot") host: boot ROM -> second stage -> file server -> mass storage.

One :class:`UsbBoot` drives one module on one USB port, stage by stage, each against its own timeout
(usbboot-protocol.md sections 2-4 and 10.1). Unlike rpiboot it never loops forever and never reports
success on a failed transfer: every failure is a typed error naming the stage, blaming the rig
(:class:`InfrastructureError`) or the module (:class:`ProductError`), and carrying the trace so far.

Where rpiboot is lenient on purpose it is lenient too, but bounded and on the record: a non-zero ROM status
is recorded and reported, not fatal (rpiboot prints it and goes on, usbboot main.c:651-663), and a failed ROM
exchange is repeated up to ``rom_retries`` times (rpiboot loops; marginal hosts need it, usbboot #87, #73).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import usb.backend.libusb1
import usb.core
import usb.util

from hil.errors import HilError, InfrastructureError, InputError, ProductError
from hil.models import ModuleModel
from hil.rig import DEFAULT_TIMEOUTS, Rig
from hil.usbboot.events import PortEvents
from hil.usbboot.fileserver import FoundFile, Payload, parse_metadata, write_metadata
from hil.usbboot.selection import (
    Endpoints,
    Identity,
    Stage,
    endpoints,
    find_on_port,
    identity,
    model_for_rom,
    port_not_on_host,
)
from hil.usbboot.trace import FileServed, Listener, StageTiming, Trace, Transfer
from hil.usbport import UsbPort

DEFAULT_SETTLE = 1.0  # s between enumeration and the first vendor request (rpiboot's sleep(1), section 3.2)
DEFAULT_ROM_RETRIES = 2  # failed ROM exchanges repeated per boot (rpiboot repeats without bound, main.c:1064-1121)
STATUS_GRACE = 1.0  # s for a new enumeration after a non-zero status before the ROM is tried again (main.c:1118)
SIGNATURE_FILE = "bootcode.sig"  # rpiboot -s: 20 bytes into the boot message, BCM2835/2837 only (main.c:157-166)
SIGNATURE_SIZE = 20
SIGNED_CHIPS = ("bcm2835", "bcm2837")  # BCM2711 and BCM2712 sign their boot another way (main.c:157)
MAX_CHUNK = 16384  # LIBUSB_MAX_TRANSFER: bulk OUT chunk size (section 2)
ANNOUNCE_TIMEOUT = 1.0  # s, per transfer, as rpiboot (section 2)
BULK_TIMEOUT = 5.0
READ_TIMEOUT = 20.0  # the device completes a control IN only when ready: long enough for EEPROM flashing
REQUEST_RETRIES = 5  # consecutive failed request reads (other than timeouts) before giving up (section 10.1)
REQUEST_MESSAGE = 260  # int32 command + char[256] name
_GONE = ("no_device", "io")  # the device left the bus (rpiboot's "device went away")
_LIBUSB_RESULTS = {-1: "io", -3: "access", -4: "no_device", -6: "busy", -7: "timeout", -8: "overflow",
                   -9: "pipe"}


@dataclass
class UsbBootResult:
    port: str
    model: str
    payload: str
    stages: list[StageTiming]
    trace: Trace
    metadata: dict[str, str]
    files_served: list[FileServed]
    final_identity: Identity | None
    rom_attempts: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port, "model": self.model, "payload": self.payload,
            "stages": [asdict(s) for s in self.stages],
            "metadata": self.metadata,
            "files_served": [asdict(f) for f in self.files_served],
            "final_identity": self.final_identity.to_dict() if self.final_identity else None,
            "rom_attempts": self.rom_attempts,
            "trace": self.trace.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


class _TransferFailed(Exception):
    def __init__(self, result: str, what: str):
        super().__init__(f"{what}: {result}")
        self.result = result
        self.what = what


def _result_of(e: usb.core.USBError) -> str:
    if isinstance(e, usb.core.USBTimeoutError):
        return "timeout"
    code = e.backend_error_code
    return _LIBUSB_RESULTS.get(code, f"error {code}") if code is not None else f"errno {e.errno}"


class _Link:
    """The vendor-request transport of one enumeration (section 2), every transfer traced."""

    def __init__(self, dev: usb.core.Device, eps: Endpoints, trace: Trace, stage: str, deadline: float,
                 clock: Callable[[], float], read_timeout: float):
        self.dev, self.eps, self.trace, self.stage = dev, eps, trace, stage
        self.deadline, self.clock, self.read_timeout = deadline, clock, read_timeout

    def _timeout_ms(self, limit: float) -> int:
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise _TransferFailed("stage timeout", "no time left in the stage")
        return max(1, int(min(limit, remaining) * 1000))

    def _record(self, kind: str, req: tuple[int, int, int, int] | None, endpoint: int, length: int,
                started: float, actual: int, result: str, note: str) -> None:
        rt, r, v, i = req if req else (None, None, None, None)
        self.trace.transfer(Transfer(started - self.trace.t0, self.stage, kind, rt, r, v, i, endpoint, length,
                                     actual, self.clock() - started, result, note))

    def announce(self, n: int, note: str) -> None:
        """Control OUT carrying a length in wValue/wIndex; also the GetFileSize reply and the bare ACK."""
        setup = (0x40, 0, n & 0xFFFF, n >> 16)
        timeout = self._timeout_ms(ANNOUNCE_TIMEOUT)
        started = self.clock()
        try:
            self.dev.ctrl_transfer(*setup, None, timeout)
        except usb.core.USBError as e:
            self._record("control_out", setup, 0, 0, started, 0, _result_of(e), note)
            raise _TransferFailed(_result_of(e), f"announce({n}) for {note}") from None
        self._record("control_out", setup, 0, 0, started, 0, "ok", note)

    def write(self, data: bytes, note: str) -> None:
        """announce(len) then the data in bulk chunks of at most 16 KiB; no zero-length packet."""
        self.announce(len(data), note)
        for offset in range(0, len(data), MAX_CHUNK):
            chunk = data[offset:offset + MAX_CHUNK]
            timeout = self._timeout_ms(BULK_TIMEOUT)
            started = self.clock()
            try:
                sent = self.dev.write(self.eps.out_ep, chunk, timeout)
            except usb.core.USBError as e:
                self._record("bulk_out", None, self.eps.out_ep, len(chunk), started, 0, _result_of(e), note)
                raise _TransferFailed(_result_of(e), f"bulk OUT at byte {offset} of {note}") from None
            result = "ok" if sent == len(chunk) else "short"
            self._record("bulk_out", None, self.eps.out_ep, len(chunk), started, sent, result, note)
            if sent != len(chunk):
                raise _TransferFailed("short", f"bulk OUT at byte {offset} of {note}: {sent} of {len(chunk)}")

    def read(self, n: int, note: str) -> bytes:
        """Control IN of ``n`` bytes; a short reply is padded, as rpiboot does not check the length."""
        setup = (0xC0, 0, n & 0xFFFF, n >> 16)
        timeout = self._timeout_ms(self.read_timeout)
        started = self.clock()
        try:
            data = bytes(self.dev.ctrl_transfer(*setup, n, timeout))
        except usb.core.USBError as e:
            self._record("control_in", setup, 0, n, started, 0, _result_of(e), note)
            raise _TransferFailed(_result_of(e), f"read({n}) for {note}") from None
        self._record("control_in", setup, 0, n, started, len(data), "ok", note)
        return data.ljust(n, b"\0")


class UsbBoot:
    """Boot the module on ``port`` from ``payload`` (a usbboot folder such as ``mass-storage-gadget64``).

    ``model`` may be None: the ROM's PID then decides the chip family. ``expect_mass_storage`` None means
    "unless the payload is an EEPROM recovery folder". ``settle`` is the pause between enumeration and the
    first vendor request that real modules need. ``read_timeout`` bounds each control IN (status, file
    request); a timed-out request read is repeated until the file-server stage runs out of time.
    """

    def __init__(self, port: str, payload: str | Path, model: ModuleModel | None = None, *,
                 timeouts: Mapping[str, float] | None = None, settle: float = DEFAULT_SETTLE,
                 rom_retries: int = DEFAULT_ROM_RETRIES, read_timeout: float = READ_TIMEOUT,
                 signed: bool = False, expect_mass_storage: bool | None = None,
                 metadata_json: Path | None = None, backend: Any = None, listener: Listener | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.port = UsbPort(port)
        self.folder = Path(payload)
        self.model = model
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        if settle < 0 or rom_retries < 0 or read_timeout <= 0:
            raise InputError(f"settle {settle} s, rom_retries {rom_retries}, read_timeout {read_timeout} "
                             "s: use settle >= 0, zero or more ROM retries and a positive read timeout",
                             stage="usbboot")
        self.settle = settle
        self.read_timeout = read_timeout
        self.rom_retries = rom_retries
        self.signed = signed
        self.expect_mass_storage = expect_mass_storage
        self.metadata_json = metadata_json
        self.backend = backend
        self.clock = clock
        self.trace = Trace(listener=listener or Listener(), clock=clock)
        self.metadata: dict[str, str] = {}
        self.attempts: list[dict[str, Any]] = []
        self._payload: Payload | None = None
        self._stale: set[tuple[int, int]] = set()  # (bus, address) of enumerations we are done with
        self._events: PortEvents | None = None

    @classmethod
    def for_rig(cls, rig: Rig, payload: str | Path | None = None, **options: Any) -> UsbBoot:
        """The rig's module on the rig's port, with the rig's stage timeouts, ROM retries, signed boot, time scale
        and (unless given) payload."""
        folder = payload or rig.payload
        if folder is None:
            raise InputError(f"rig {rig.name} has no payload folder. Fix: add payload = \"DIR\" under [usb] "
                             f"in {rig.path} or pass --payload DIR", stage="usbboot.payload")
        options = {"rom_retries": rig.usb_boot.rom_retries, "signed": rig.usb_boot.signed,
                   "settle": DEFAULT_SETTLE * rig.time_scale, **options}
        return cls(rig.usb_port, folder, rig.model, timeouts=rig.timeouts, **options)

    # -- the stage sequence -------------------------------------------------------------------------------

    def run(self) -> UsbBootResult:
        if self.model is not None:
            self._load_payload(self.model)  # a missing folder or second stage fails here, before any device
            self._signature(self.model)
        elif not self.folder.is_dir():
            raise InputError(f"payload folder {self.folder} does not exist. Fix: pass an existing usbboot "
                             "folder", stage="usbboot.payload", folder=str(self.folder))
        backend = self.backend or usb.backend.libusb1.get_backend()
        if backend is None:
            raise InfrastructureError("libusb-1.0 is not available. Fix: install libusb-1.0-0",
                                      stage="usbboot")
        self.backend = backend
        with PortEvents(self.port, on_event=self.trace.event, clock=self.clock) as events:
            self._events = events
            try:
                final = self._sequence()
            finally:
                self._events = None
        if self.metadata_json is not None:
            write_metadata(self.metadata, self.metadata_json)
        return self._result(final)

    def _sequence(self) -> Identity | None:
        dev = self._wait("rom", "rom", (Stage.ROM, Stage.SECOND_STAGE), InfrastructureError,
                         "no boot ROM appeared. Fix: check that nRPI_BOOT is asserted before power-on, the "
                         "module is powered and its USB slave port is cabled to this port")
        took = False
        failures = 0
        while identity(dev).stage is Stage.ROM:
            if len(self.attempts) > self.rom_retries + 1:  # bounded whatever the ROM does
                raise self._error(ProductError, "second_stage", "the boot ROM enumerated "
                                  f"{len(self.attempts) + 1} times without starting the second stage "
                                  f"({self.rom_retries} retries allowed)")
            outcome = self._rom_pass(dev, took)
            if outcome == "took":
                took = True
            elif outcome != "stale":
                failures += 1
                if failures > self.rom_retries:
                    raise self._exhausted(outcome)
            if outcome == "status":  # it may boot anyway (a new enumeration) or stay for another try
                dev = self._after_status(dev)
            elif took:
                dev = self._wait("second_stage", "second_stage", (Stage.ROM, Stage.SECOND_STAGE), ProductError,
                                 "the second stage never enumerated after the boot ROM took it")
            else:  # as rpiboot: close, look again, and start over with whatever is on the port
                dev = self._wait("rom", "rom", (Stage.ROM, Stage.SECOND_STAGE), InfrastructureError,
                                 f"the boot ROM did not come back after a failed exchange "
                                 f"({self.attempts[-1]['outcome']})")
        second = identity(dev)
        done = self._serve(dev)
        if not self._wants_mass_storage():
            return second
        if not done:
            self._note("file_server", "the device left without Done")
        ms = self._wait("mass_storage", "mass_storage", (Stage.MASS_STORAGE, Stage.ROM), ProductError,
                        "no mass-storage device (0a5c:0001 or 0a5c:0104) appeared after the file server")
        if identity(ms).stage is Stage.ROM:
            raise self._error(ProductError, "mass_storage", "the module fell back to its boot ROM "
                              f"({identity(ms)}) after the file server: the second stage or Linux crashed")
        final = identity(ms)
        usb.util.dispose_resources(ms)
        return final

    def _after_status(self, rom: usb.core.Device) -> usb.core.Device:
        """A fresh enumeration within :data:`STATUS_GRACE` (the ROM booted despite its status), else the same
        ROM again for the next exchange."""
        key = (rom.bus, rom.address)
        self._stale.add(key)
        dev = self._wait("rom", "rom", (Stage.ROM, Stage.SECOND_STAGE), InfrastructureError, "", grace=STATUS_GRACE)
        if dev is not None:
            return dev
        self._stale.discard(key)
        return self._wait("rom", "rom", (Stage.ROM, Stage.SECOND_STAGE), InfrastructureError,
                          "the boot ROM left after answering a non-zero status and nothing came back")

    def _exhausted(self, outcome: str) -> HilError:
        tries = f"{len(self.attempts)} exchanges ({self.rom_retries} retries allowed)"
        last = self.attempts[-1]
        if outcome == "status":
            return self._error(ProductError, "rom_transfer", f"the boot ROM answered status {last['status']:#x} "
                               f"and stayed in its ROM on all {tries}. Fix: use a second stage signed/built "
                               "for this module")
        return self._error(InfrastructureError, "rom_transfer", f"{last['outcome']} on all {tries}. Fix: check "
                           "the USB cable and hub (usbboot-protocol.md section 6), try another host port, or "
                           "raise [usb] rom_retries in the rig file")

    def _signature(self, model: ModuleModel) -> bytes:
        """The 20 signature bytes of the boot message: zeros, or ``bootcode.sig`` when signed (rpiboot -s)."""
        if not self.signed or model.chip not in SIGNED_CHIPS:
            return bytes(SIGNATURE_SIZE)
        found = self._load_payload(model).find(SIGNATURE_FILE)
        if found is None or len(found.data) < SIGNATURE_SIZE:
            what = "is missing" if found is None else f"has {len(found.data)} bytes, not {SIGNATURE_SIZE}"
            raise InputError(f"signed boot: {SIGNATURE_FILE} {what} in {self.folder}. Fix: put the "
                             f"{model.name}'s {SIGNATURE_FILE} in the payload or drop signed_boot",
                             stage="usbboot.payload", folder=str(self.folder))
        return found.data[:SIGNATURE_SIZE]

    def _rom_pass(self, dev: usb.core.Device, after_took: bool) -> str:
        """One ROM exchange: "took" (status 0, or the ROM left before its status), "status" (a non-zero status,
        recorded), "failed" (a transfer failed), or "stale" (a ROM already leaving after it took the image)."""
        ident = identity(dev)
        model = model_for_rom(ident.pid)
        if self.model is not None and self.model.rom_pid != ident.pid:
            raise InputError(f"port {self.port} has a {model.chip} boot ROM ({ident}) but the rig says "
                             f"{self.model.name}. Fix: correct the model in the rig file or the port",
                             stage="usbboot.rom", trace=self.trace.to_dict())
        chosen = self.model or model
        image = self._load_payload(chosen).second_stage()
        signature = self._signature(chosen)
        attempt = len(self.attempts) + 1
        record: dict[str, Any] = {"attempt": attempt, "identity": ident.to_dict(), "signed": any(signature),
                                  "started": self.trace.now()}
        self.attempts.append(record)
        self._settle("rom.settle", attempt)
        stage = self.trace.begin("rom_transfer", attempt)
        try:
            link = self._link(dev, stage)
            message = len(image.data).to_bytes(4, "little") + signature
            link.write(message, "boot message")
            link.write(image.data, chosen.second_stage)
            try:
                status = int.from_bytes(link.read(4, "ROM status")[:4], "little")
            except _TransferFailed as e:
                if e.result not in _GONE:
                    raise
                status = None  # the ROM left right after the image: its status is lost, not bad (PR #49)
        except (_TransferFailed, usb.core.USBError, ValueError) as e:
            what = (str(e) if isinstance(e, _TransferFailed) else f"opening the device: {_result_of(e)}"
                    if isinstance(e, usb.core.USBError) else f"the device's endpoints: {e}")
            self.trace.end(stage, False, what)
            record["outcome"] = what
            if after_took:  # a ROM that is already leaving (section 3.3): harmless, look again
                self._forget(dev)
                record["outcome"] = f"stale ROM: {what}"
                return "stale"
            usb.util.dispose_resources(dev)  # not stale: a ROM still on the bus gets the next try
            return "failed"
        record["status"] = status
        if status not in (0, None):
            usb.util.dispose_resources(dev)  # a ROM that stayed gets the next try; one that boots anyway leaves
            detail = f"status {status:#x}: recorded, not fatal (rpiboot reports it and goes on)"
            self.trace.end(stage, True, detail)
            record["outcome"] = f"status {status:#x}"
            return "status"
        self._forget(dev)
        self.trace.end(stage, True, "status 0" if status == 0 else "device left before its status")
        record["outcome"] = "ok"
        return "took"

    def _serve(self, dev: usb.core.Device) -> bool:
        """The second stage's file server (section 4.2). True when it ended with Done."""
        ident = identity(dev)
        payload = self._load_payload(self.model or model_for_rom(ident.pid))
        self._settle("second_stage.settle", 1)
        stage = self.trace.begin("file_server")
        pending: FoundFile | None = None
        failures = 0
        try:
            link = self._link(dev, stage)
            while True:
                try:
                    message = link.read(REQUEST_MESSAGE, "request")
                except _TransferFailed as e:
                    if e.result in _GONE or e.result == "stage timeout":
                        raise
                    if e.result != "timeout":  # busy device: ask again; anything else: back off, bounded
                        failures += 1
                        if failures > REQUEST_RETRIES:
                            raise
                        time.sleep(min(0.05 * 2**failures, max(0.0, link.deadline - self.clock())))
                    continue
                failures = 0
                command = int.from_bytes(message[:4], "little", signed=True)
                name = message[4:].split(b"\0", 1)[0].decode("ascii", "replace")
                if not name:
                    link.announce(0, "done (empty name)")
                    break
                if name.startswith("*") and command != 2:
                    item = parse_metadata(name)
                    if item:
                        self.metadata[item[0]] = item[1]
                    link.announce(0, f"metadata {name}")
                elif command == 0:
                    pending = payload.find(name)
                    if pending is None:
                        link.announce(0, f"missing {name}")
                        self.trace.file(FileServed(name, 0, ""))
                    else:
                        link.announce(len(pending.data), f"size of {name}")
                elif command == 1:
                    if pending is None:
                        link.announce(0, f"no open file for {name}")
                    else:
                        link.write(pending.data, name)
                        self.trace.file(FileServed(name, len(pending.data), pending.source))
                        pending = None
                elif command == 2:
                    break
                else:
                    self.trace.end(stage, False, f"unknown command {command}")
                    raise self._error(ProductError, "file_server", f"the second stage sent unknown command "
                                      f"{command} for {name!r}")
        except _TransferFailed as e:
            if e.result in _GONE:
                self.trace.end(stage, True, f"device left: {e}")
                return False
            self.trace.end(stage, False, str(e))
            if e.result == "stage timeout":
                raise self._error(ProductError, "file_server", "the second stage did not finish within "
                                  f"{self.timeouts['file_server']:g} s (no Done)") from None
            raise self._error(InfrastructureError, "file_server",
                              f"{e}. Fix: check the USB cable and hub") from None
        except usb.core.USBError as e:
            self.trace.end(stage, False, f"opening the device: {_result_of(e)}")
            raise self._error(InfrastructureError, "file_server", "cannot open the second stage and claim "
                              f"its interface ({_result_of(e)}). Fix: stop other programs (rpiboot) using "
                              f"port {self.port}") from None
        finally:
            self._forget(dev)
        self.trace.end(stage, True, "done")
        return True

    # -- helpers ------------------------------------------------------------------------------------------

    def _load_payload(self, model: ModuleModel) -> Payload:
        """The payload for this chip family, checked to hold its second stage."""
        if self._payload is None or self._payload.model.chip_dir != model.chip_dir:
            payload = Payload(self.folder, model)
            payload.second_stage()
            self._payload = payload
        return self._payload

    def _wants_mass_storage(self) -> bool:
        if self.expect_mass_storage is not None:
            return self.expect_mass_storage
        return not (self._payload is not None and self._payload.is_recovery)

    def _link(self, dev: usb.core.Device, stage: StageTiming) -> _Link:
        """Open the enumeration: pick its interface and endpoint and claim the interface (nothing else)."""
        eps = endpoints(dev)
        usb.util.claim_interface(dev, eps.interface)
        return _Link(dev, eps, self.trace, stage.name, self.clock() + self.timeouts[stage.name], self.clock,
                     self.read_timeout)

    def _settle(self, name: str, attempt: int) -> None:
        stage = self.trace.begin(name, attempt)
        time.sleep(self.settle)
        self.trace.end(stage, True)

    def _forget(self, dev: usb.core.Device) -> None:
        """Done with this enumeration: release it and never mistake it for a new one."""
        self._stale.add((dev.bus, dev.address))
        usb.util.dispose_resources(dev)

    @overload
    def _wait(self, name: str, timeout_key: str, wanted: tuple[Stage, ...], blame: type[HilError],
              problem: str) -> usb.core.Device: ...

    @overload
    def _wait(self, name: str, timeout_key: str, wanted: tuple[Stage, ...], blame: type[HilError],
              problem: str, *, grace: float) -> usb.core.Device | None: ...

    def _wait(self, name: str, timeout_key: str, wanted: tuple[Stage, ...], blame: type[HilError],
              problem: str, *, grace: float | None = None) -> usb.core.Device | None:
        """Block on uevents until a fresh enumeration in one of the ``wanted`` stages is on our port.
        With ``grace`` seconds, nothing by then is an answer (None), not a failure."""
        assert self._events is not None
        attempt = 1 + sum(1 for s in self.trace.stages if s.name == name)
        stage = self.trace.begin(name, attempt)
        timeout = self.timeouts[timeout_key] if grace is None else grace
        seen: list[Identity] = []

        def probe() -> usb.core.Device | None:
            for dev in find_on_port(self.port, self.backend):
                ident = identity(dev)
                if (ident.bus, ident.address) in self._stale:
                    continue
                if ident.stage in wanted:
                    return dev
                if ident not in seen:
                    seen.append(ident)
            return None

        dev = self._events.wait(probe, self.clock() + timeout)
        if dev is None and grace is not None:
            self.trace.end(stage, True, f"nothing new within {grace:g} s")
            return None
        if dev is None:
            saw = f"; saw {', '.join(map(str, seen))}" if seen else ""
            missing = None if seen or name != "rom" else port_not_on_host(self.port)
            if missing:
                saw = f": {missing} (correct the port; lsusb -t shows this host's ports)"
            self.trace.end(stage, False, f"timeout after {timeout:g} s{saw}")
            raise self._error(blame, name, f"{problem} on port {self.port} within {timeout:g} s{saw}")
        self.trace.end(stage, True, str(identity(dev)))
        return dev

    def _note(self, name: str, detail: str) -> None:
        for stage in reversed(self.trace.stages):
            if stage.name == name:
                stage.detail = f"{stage.detail}; {detail}" if stage.detail else detail
                return

    def _error(self, kind: type[HilError], stage: str, message: str) -> HilError:
        return kind(message, stage=f"usbboot.{stage}", port=str(self.port), trace=self.trace.to_dict(),
                    rom_attempts=list(self.attempts))

    def _result(self, final: Identity | None) -> UsbBootResult:
        model = self.model or (self._payload.model if self._payload else None)
        return UsbBootResult(str(self.port), model.name if model else "", str(self.folder), self.trace.stages,
                             self.trace, dict(self.metadata), list(self.trace.files), final, self.attempts)
