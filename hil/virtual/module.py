"""The virtual module's body: it follows its relays as a real Compute Module on a carrier board does.

- Power: applying it resets the SoC, which samples nRPI_BOOT and boots over USB (handed to the USB
  side, if the caller attached one) or from its eMMC (:mod:`hil.virtual.firmware`, then
  :mod:`hil.virtual.shell` on the console). Cutting it stops everything at once (console output mid-line,
  shell state, the USB device) once the board's capacitors have drained: a cut shorter than
  :data:`DISCHARGE_SECONDS` (hardware time, so divided by the speed-up) goes unnoticed, which is what a
  rig's ``off_time`` is there to avoid.
- nRPI_BOOT: sampled only when the SoC resets (power-on, or ``reboot``); changing it while the module
  runs changes nothing.
- ``boot_engine = "qemu"`` (CM3): the eMMC boot runs a real kernel under QEMU (:mod:`hil.virtual.qemu`),
  which lives exactly as long as that power-on; no boot (USB boot included) starts before it is gone, so
  the eMMC is never written from two sides at once.
- EEPROM_nWP: only its level is kept (:attr:`VirtualModule.eeprom_write_protected`), for the EEPROM.
- EEPROM (CM4/CM5): its bootloader and boot.conf decide what the eMMC boot prints and tries
  (:mod:`hil.virtual.eeprom`); without a valid one the ROM stays silent and falls back to USB boot.

Relay callbacks run in the framework's thread and return at once; each power-on runs in a thread of
its own, and every delay in it is a :meth:`DeviceClock.sleep` that a power cut interrupts.
"""

from __future__ import annotations

import enum
import functools
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from hil.errors import HilError
from hil.rig import RelayLine, Rig
from hil.virtual import firmware, qemu
from hil.virtual.console import VirtualConsole
from hil.virtual.eeprom import VirtualEeprom
from hil.virtual.emmc import VirtualEmmc
from hil.virtual.journal import Journal
from hil.virtual.relays import Level, RelayBoardFactory
from hil.virtual.shell import LineEditor, Shell
from hil.virtual.timing import DeviceClock

#: Hardware seconds a Compute Module keeps running on its capacitors after its supply is cut.
DISCHARGE_SECONDS = 0.5


class State(enum.StrEnum):
    OFF = "off"
    USB_BOOT = "usb-boot"  # the boot ROM (and what the host sends it) runs over USB
    EMMC_BOOT = "emmc-boot"  # booting from the eMMC, or stuck on the way
    RUNNING = "running"  # a login prompt on the console
    LOGGED_IN = "logged-in"
    HALTED = "halted"  # after poweroff: powered, but nothing runs until power is cycled


class UsbSide(Protocol):
    """What the module tells its USB device model: the SoC reset into USB boot (or not), or lost power.

    Called in order from the module's own threads (never a relay callback), outside its lock.
    """

    def power_on(self, usb_boot: bool) -> None: ...

    def power_off(self) -> None: ...


class _Session:
    """The SoC running, from power-on until power is lost."""

    def __init__(self, usb_boot: bool):
        self.usb_boot = usb_boot  # nRPI_BOOT as sampled at power-on
        self.cancel = threading.Event()
        self.inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.listening = False  # a getty or shell reads the console
        self.thread: threading.Thread | None = None
        self.engine: qemu.QemuBoot | None = None  # the QEMU of this power-on (boot_engine = "qemu")


class VirtualModule:
    def __init__(self, rig: Rig, emmc: VirtualEmmc, console: VirtualConsole, clock: DeviceClock,
                 journal: Journal, eeprom: VirtualEeprom | None = None):
        self.rig = rig
        self.emmc = emmc
        self.console = console
        self.clock = clock
        self.journal = journal
        self.usb: UsbSide | None = None
        self._lock = threading.RLock()
        self._usb_lock = threading.Lock()
        self._usb_owner: _Session | None = None  # the power-on whose USB device is on the bus
        self._changed = threading.Condition(self._lock)
        self._state = State.OFF
        self._energised = {"power": False, "nrpi_boot": False, "eeprom_nwp": False}
        self._session: _Session | None = None
        self._discharge: threading.Timer | None = None
        self._cut_at = 0.0  # when power was last cut (monotonic), to judge discharge by the clock, not the timer
        self._token = object()  # the pending discharge; a newer one (or a power return) voids it
        self._unwatch: list[Callable[[], None]] = []
        self._serial = firmware.serial_number(rig.name)
        self._qemu = rig.virtual is not None and rig.virtual.boot_engine == "qemu"
        self._qemu_alive = threading.Lock()  # held while a QEMU runs
        if self._qemu:
            qemu.check_host()
        self.eeprom = eeprom or (VirtualEeprom(rig.model, None, journal, lambda: self.eeprom_write_protected,
                                               boot_uart=rig.customise.bootloader_uart)
                                 if rig.model.has_eeprom else None)
        console.on_receive(self._received)

    # -- what the outside sees ---------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def powered(self) -> bool:
        """The SoC runs (power applied, or cut for less than the discharge time)."""
        return self._session is not None

    @property
    def eeprom_write_protected(self) -> bool:
        """EEPROM_nWP is pulled low by its relay (read without the lock: the USB side may ask any time)."""
        return self._energised["eeprom_nwp"]

    def wait_state(self, state: State | str, timeout: float) -> bool:
        """Wait (host seconds) until the module is in ``state``; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._state == state, timeout)

    def connect_relays(self, factory: RelayBoardFactory) -> None:
        """Follow the rig's relay lines on ``factory``, starting from their present levels."""
        for line in self.rig.relays.lines():
            factory.set_pull(line.gpio, line.active_high == self._rests_on(line))
            self._unwatch.append(functools.partial(factory.clear_pull, line.gpio))
            self._unwatch.append(factory.watch(line.gpio, functools.partial(self._line_changed, line)))
            self._line_changed(line, factory.level(line.gpio))

    def _rests_on(self, line: RelayLine) -> bool:
        """Whether the modelled board energises ``line`` when nothing drives it."""
        modelled = self.rig.virtual.relay_rest if self.rig.virtual is not None else {}
        return modelled.get(line.role, line.rest_on)

    def close(self) -> None:
        """Let go of the relays and power down for good."""
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch.clear()
        with self._lock:
            if self._discharge is not None:
                self._discharge.cancel()
                self._discharge = None
            session = self._stop("closed")
        if session is not None:
            self._power_down(session)
            if session.thread is not None:
                session.thread.join(timeout=5.0)
        with self._qemu_alive:  # also one that a power cut just before is still taking down
            pass

    # -- relays ------------------------------------------------------------------------------------

    def _line_changed(self, line: RelayLine, level: Level) -> None:
        energised = self._rests_on(line) if level is None else level == line.active_high
        self._input_changed(line.role, energised, gpio=line.gpio, level=level)

    def supply(self, on: bool, source: str) -> None:
        """Power applied or cut by something other than a relay: a hub port (uhubctl), a switched socket."""
        self._input_changed("power", on, source=source)

    def _input_changed(self, role: str, energised: bool, **details: object) -> None:
        drained: _Session | None = None
        with self._lock:
            if self._energised[role] == energised:
                return
            self._energised[role] = energised
            self.journal.record("relay", role, energised=energised, **details)
            if role != "power":
                return
            if not energised:
                if self._session is not None:
                    self._cut_at = time.monotonic()
                    self._discharge = threading.Timer(self.clock.scaled(DISCHARGE_SECONDS), self._discharged,
                                                      args=(self._discharge_token(),))
                    self._discharge.daemon = True
                    self._discharge.start()
                return
            if self._discharge is None or time.monotonic() - self._cut_at < self.clock.scaled(DISCHARGE_SECONDS):
                self._power_applied()
                return
            # Drained, though the timer has not run yet (a busy host): the SoC did lose power.
            self._discharge.cancel()
            self._discharge = None
            self._discharge_token()
            drained = self._stop("power cut")
        if drained is not None:
            self._power_down(drained)
        with self._lock:
            if self._energised["power"]:
                self._power_applied()

    def _discharge_token(self) -> object:
        self._token = object()
        return self._token

    def _power_applied(self) -> None:
        if self._discharge is not None:  # back before the capacitors drained: the SoC never noticed
            self._discharge.cancel()
            self._discharge = None
            self._discharge_token()
            self.journal.record("power", "glitch ignored", discharge_s=self.clock.scaled(DISCHARGE_SECONDS))
            return
        if self._session is not None:
            return
        session = _Session(self._energised["nrpi_boot"])
        self._session = session
        self.journal.record("power", "on", usb_boot=session.usb_boot)
        session.thread = threading.Thread(target=self._run, args=(session,), daemon=True,
                                          name=f"virtual-module {self.rig.name}")
        session.thread.start()

    def _discharged(self, token: object) -> None:
        with self._lock:
            if token is not self._token or self._energised["power"]:
                return
            self._discharge = None
            session = self._stop("power cut")
        if session is not None:
            self._power_down(session)

    def _stop(self, reason: str) -> _Session | None:
        """Everything the SoC was doing ends now (lock held); then call :meth:`_power_down`."""
        session, self._session = self._session, None
        if session is None:
            return None
        session.cancel.set()
        session.inbox.put(None)
        self.console.discard()
        self.journal.record("power", "off", reason=reason)
        return session

    def _power_down(self, session: _Session) -> None:
        """The USB device goes with the power (outside the lock: the USB side may block), then: off."""
        if session.engine is not None:
            session.engine.stop()
        self._usb(session, None)
        with self._lock:
            if self._session is None:  # unless power is already back and a new boot runs
                self._set_state(None, State.OFF)

    # -- the running SoC ---------------------------------------------------------------------------

    def _run(self, session: _Session) -> None:
        usb_boot = session.usb_boot
        while self._boot(session, usb_boot) == "reboot":
            usb_boot = self._energised["nrpi_boot"]  # a reset samples nRPI_BOOT again
            self._usb(session, None)

    def _boot(self, session: _Session, usb_boot: bool) -> str | None:
        """One boot after a reset; "reboot" if it ends in a reset of the SoC."""
        with self._qemu_alive:  # the previous power-on's QEMU is gone
            pass
        if usb_boot:
            self._enter_usb_boot(session, "nRPI_BOOT")
            return None
        self._set_state(session, State.EMMC_BOOT)
        self._usb(session, False)
        if self._qemu:
            return self._boot_qemu(session)
        started = time.monotonic()
        log = firmware.boot(self.rig.model, self.emmc.image_path, self._serial,
                            self.eeprom.bootloader() if self.eeprom is not None else None,
                            uart=self.rig.customise.uart)
        try:
            while True:
                if not self._emit(session, next(log)):
                    return None
        except StopIteration as end:
            outcome = end.value
        except HilError as e:  # the host could not read the image: the model, not the module, failed
            self.journal.record("fault", "eMMC unreadable by the virtual module", error=str(e))
            return None
        if isinstance(outcome, firmware.UsbFallback):
            self._enter_usb_boot(session, "nothing to boot on the eMMC")
            return None
        if isinstance(outcome, firmware.Reboot):
            return "reboot"
        if isinstance(outcome, firmware.Stuck):
            self.journal.record("stage", "stuck", why=outcome.why)
            return None
        shell = Shell(outcome, lambda: (time.monotonic() - started) * self.clock.speedup)
        return self._serve(session, outcome, shell)

    def _boot_qemu(self, session: _Session) -> str | None:
        """The eMMC boot with a real kernel: the firmware's part played here, then QEMU until power goes."""
        handover = qemu.hand_over(self.rig.model, self.emmc.image_path)
        if isinstance(handover, firmware.UsbFallback):
            self._enter_usb_boot(session, "nothing to boot on the eMMC")
            return None
        if isinstance(handover, firmware.Stuck):
            self.journal.record("stage", "stuck", why=handover.why)
            return None
        with self._qemu_alive:
            machine = qemu.QemuBoot(self.emmc.image_path, handover, self.console, self.journal,
                                    login=self.rig.markers["login"],
                                    on_login=lambda: self._set_state(session, State.RUNNING))
            with self._lock:
                if session.cancel.is_set():
                    return None
                session.engine = machine
            try:
                machine.start()
                ending = machine.wait(session.cancel)
            except (HilError, OSError) as e:  # the host could not run QEMU: the rig, not the module, failed
                self.journal.record("fault", "QEMU did not run", error=str(e))
                return None
            finally:
                machine.stop()
        if ending == "halt":
            self._set_state(session, State.HALTED)
            self._usb(session, None)
        return ending if ending == "reboot" else None

    def _enter_usb_boot(self, session: _Session, why: str) -> None:
        self._set_state(session, State.USB_BOOT)
        self.journal.record("stage", "usb-boot", why=why, usb_side=self.usb is not None)
        self._usb(session, True)

    def _usb(self, session: _Session, usb_boot: bool | None) -> None:
        """Tell the USB side about a reset of ``session`` (``usb_boot``: what the ROM chose) or its power
        loss (None). Never under the module's lock; the USB lock keeps the calls in order, and a session
        that lost power can only take down its own USB device, not the next power-on's.
        """
        with self._usb_lock:
            if self.usb is None:
                return
            if usb_boot is None and self._usb_owner is not session:
                return
            if usb_boot is not None and session.cancel.is_set():
                return
            if self._usb_owner is not None:
                self.usb.power_off()
                self._usb_owner = None
            if usb_boot is not None:
                self.usb.power_on(usb_boot)
                self._usb_owner = session

    def _serve(self, session: _Session, system: firmware.System, shell: Shell) -> str | None:
        """The getty and shell on the console until poweroff, reboot or power loss."""
        editor = LineEditor()
        for e in shell.getty():
            if not self._emit(session, e):
                return None
        session.listening = True
        self._set_state(session, State.RUNNING)
        while True:
            data = session.inbox.get()
            if data is None or session.cancel.is_set():
                return None
            echo, lines = editor.feed(data, shell.echo)
            if not self._emit(session, firmware.Emit(0.0, echo, system.baud)):
                return None
            for line in lines:
                reply = shell.feed(line)
                for e in reply.emits:
                    if not self._emit(session, e):
                        return None
                if reply.action is not None:
                    session.listening = False
                    if reply.action == "reboot":
                        return "reboot"
                    self._set_state(session, State.HALTED)
                    self._usb(session, None)
                    return None
                self._set_state(session, State.LOGGED_IN if shell.logged_in else State.RUNNING)

    def _emit(self, session: _Session, e: firmware.Emit) -> bool:
        """Wait the output's delay, then send it, unless power went first."""
        if not self.clock.sleep(e.delay, session.cancel):
            return False
        with self._lock:
            if session.cancel.is_set():
                return False
            if e.text:
                self.console.write(e.text, baud=e.baud)
        return True

    def _received(self, data: bytes) -> None:
        session = self._session
        if session is not None and session.engine is not None:
            session.engine.send(data)
        elif session is not None and session.listening:
            session.inbox.put(data)  # before a getty runs, typed input is flushed and lost

    def _set_state(self, session: _Session | None, state: State) -> None:
        """Move to ``state``, unless ``session`` (None: whatever runs) has already lost power."""
        with self._changed:
            if session is not None and session is not self._session:
                return
            if self._state != state:
                self._state = state
                self.journal.record("stage", state.value)
                self._changed.notify_all()
