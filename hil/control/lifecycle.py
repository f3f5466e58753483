"""One rig's module, moved between its states with a guaranteed way back to safe.

States: off -> usb-boot (ROM confirmed on the port) -> mass-storage (usbboot host done) -> flashed ->
booted (milestones and build-id confirmed) -> logged-in. Each transition is idempotent (asking for the
state the module is in does nothing), bounded by the rig's stage timeouts, and ends safe when it fails:
power off, nRPI_BOOT released, EEPROM_nWP at its resting level. Closing does the same, also on Ctrl-C,
SIGTERM and SIGHUP (their handlers raise, so the ``with`` block unwinds).

Two processes must never drive one rig, so :class:`Lifecycle` holds an exclusive ``flock`` on a file
under :func:`hil.rig.runtime_dir`. Only SIGKILL (or a power failure of the controller) skips the
cleanup; for that, a state file records "relays on" *before* anything is switched on, and the next
:meth:`Lifecycle.open` that finds it set powers the module off and says so (:attr:`Lifecycle.recovered`).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from hil.control.bootconfirm import BootRecord, check_console, confirm_boot
from hil.control.bootmode import BootMode, find_rom, wait_for_rom
from hil.control.console import CommandResult, Console
from hil.control.power import PowerSwitch, power_switch
from hil.errors import HilError, InfrastructureError, InputError
from hil.flash import bootfacts
from hil.flash.bootfacts import BootFacts
from hil.rig import Rig, runtime_dir
from hil.runtime import open_private, private_dir
from hil.usbboot.selection import Identity

if TYPE_CHECKING:
    from hil.lab.locks import RigLockBackend
    from hil.usbboot.host import UsbBootResult

log = logging.getLogger(__name__)
T = TypeVar("T")
STAGE = "lifecycle"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ModuleState(enum.StrEnum):
    OFF = "off"
    POWERED = "powered"  # switched on in eMMC boot mode, nothing confirmed (``hil power on``)
    USB_BOOT = "usb-boot"
    MASS_STORAGE = "mass-storage"
    FLASHED = "flashed"
    BOOTED = "booted"
    LOGGED_IN = "logged-in"


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C does, then exit with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def rig_dir(rig: Rig) -> Path:
    return runtime_dir() / rig.name


def _private_rig_dir(rig: Rig) -> Path:
    """The rig's runtime folder, created 0700 and checked (see :mod:`hil.runtime`)."""
    return private_dir(rig_dir(rig), base=runtime_dir())


class RigLock:
    """An exclusive lock on one rig; the kernel drops it when its holder dies, however it dies."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.path = rig_dir(rig) / "lock"
        self._fd = -1

    def acquire(self, wait: float = 0.0) -> None:
        if self._fd >= 0:
            return
        _private_rig_dir(self.rig)
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                    os.close(fd)
                    raise InfrastructureError(f"rig {self.rig.name} is in use by {holder}. Fix: wait for it to "
                                              "finish, or stop it", stage="lifecycle.lock",
                                              lock=str(self.path)) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}) since {since}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str | None:
        """Who holds the lock now ("pid N (command) since T"), or None when the rig is free; takes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            return None
        finally:
            os.close(fd)  # drops the shared lock taken to look

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = -1


class StateFile:
    """What the rig's holder last did to the relays, kept across crashes of that holder."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.path = rig_dir(rig) / "state.json"

    def read(self) -> dict[str, Any]:
        try:
            fd = open_private(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return {}
        try:
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, *, relays_on: bool, state: ModuleState, kept: bool = False) -> None:
        record = {"relays_on": relays_on, "state": state.value, "pid": os.getpid(),
                  "argv": sys.argv[:8], "time": time.time(), "kept": kept}
        _private_rig_dir(self.rig)
        tmp = self.path.with_suffix(".tmp")
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class Lifecycle:
    """The module of one rig. Use as a context manager; every method is safe to call again."""

    def __init__(self, rig: Rig, *, log_dir: Path | None = None, usb_backend: Any = None,
                 handle_signals: bool = True, lock_wait: float = 0.0, lock: RigLockBackend | None = None):
        """``lock``: the rig's lock, already held by a caller that must own the rig before it opens anything
        else (a virtual module, say); the caller then releases it, after this lifecycle has closed."""
        self.rig = rig
        self.log_dir = log_dir
        self.usb_backend = usb_backend
        self.handle_signals = handle_signals
        self.lock_wait = lock_wait
        self.recovered: str | None = None  # what a crashed holder left, corrected at open
        self.boots: list[BootRecord] = []
        self.rom: Identity | None = None
        self.usbboot: UsbBootResult | None = None
        self.flashed_build_id: str | None = None
        self.flashed_facts: BootFacts | None = None  # what the image written here shows at boot
        self._state = ModuleState.OFF
        from hil.lab.locks import rig_lock  # the rig file picks the backend (hil.lab imports this module)

        self._lock = lock or rig_lock(rig)
        self._own_lock = lock is None
        self._state_file = StateFile(rig)
        self._power: PowerSwitch | None = None
        self._bootmode: BootMode | None = None
        self._console: Console | None = None
        self._mutex = threading.RLock()
        self._previous_handlers: dict[int, Any] = {}
        self._closing = False
        self._deferred_signal: int | None = None
        self._keep_power = False

    # -- opening and closing ----------------------------------------------------------------------

    def open(self) -> Lifecycle:
        self._lock.acquire(self.lock_wait)
        try:
            self._install_signal_handlers()
            left = self._state_file.read()
            self._power = power_switch(self.rig)
            self._bootmode = BootMode(self.rig, self._power)
            if left.get("relays_on"):
                by = "`hil power on`" if left.get("kept") else "a process that did not clean up (killed?)"
                self.recovered = (f"rig {self.rig.name} was left powered in state {left.get('state', '?')} by "
                                  f"{by}, pid {left.get('pid', '?')} {' '.join(left.get('argv') or [])}: "
                                  "powered off")
                log.warning("%s", self.recovered)
            self._bootmode.safe()
            self._state_file.write(relays_on=False, state=ModuleState.OFF)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Leave the rig safe (unless :meth:`leave_powered` said otherwise) and let go of it."""
        self._closing = True
        try:
            with self._mutex:
                self._shut_down()
        finally:
            self._restore_signal_handlers()
            if self._own_lock:
                self._lock.release()
            self._closing = False
        if self._deferred_signal is not None:
            signum, self._deferred_signal = self._deferred_signal, None
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    @contextlib.contextmanager
    def lines_released(self) -> Iterator[None]:
        """The rig safe and its relay lines let go (gpiozero inputs) for a while, as when no process holds them,
        to see how they rest (:mod:`hil.control.restcheck`); taken back and made safe again after."""
        with self._mutex:
            self.off()
            for part in (self._bootmode, self._power):
                if part is not None:
                    part.close()
            self._bootmode = self._power = None
            try:
                yield
            finally:
                self._power = power_switch(self.rig)
                self._bootmode = BootMode(self.rig, self._power)
                self._bootmode.safe()

    def _shut_down(self) -> None:
        problems: list[BaseException] = []
        if self._bootmode is not None:
            try:
                if self._keep_power:
                    self._state_file.write(relays_on=True, state=self._state, kept=True)
                else:
                    self._bootmode.safe()
                    self._state = ModuleState.OFF
                    self._state_file.write(relays_on=False, state=ModuleState.OFF)
            except Exception as e:  # the state file keeps "relays on": the next start tries again
                problems.append(e)
        for part in (self._console, self._bootmode, self._power):
            if part is not None:
                try:
                    part.close()
                except Exception as e:
                    problems.append(e)
        self._console = self._bootmode = self._power = None
        if problems:
            raise problems[0]

    def __enter__(self) -> Lifecycle:
        return self.open()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if e is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as during:
            e.add_note(f"while leaving rig {self.rig.name} safe: {during}")

    def _install_signal_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._closing:  # cleanup runs: finish it, then act on the signal
            self._deferred_signal = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    # -- what the rig is doing ----------------------------------------------------------------------

    @property
    def state(self) -> ModuleState:
        return self._state

    @property
    def power(self) -> PowerSwitch:
        if self._power is None:
            raise InfrastructureError("the lifecycle is not open; use it as a context manager", stage=STAGE)
        return self._power

    @property
    def bootmode(self) -> BootMode:
        if self._bootmode is None:
            raise InfrastructureError("the lifecycle is not open; use it as a context manager", stage=STAGE)
        return self._bootmode

    @property
    def console(self) -> Console:
        """The serial console, opened at first use and kept open (capturing) until close."""
        if self._console is None:
            log_path = (self.log_dir or rig_dir(self.rig)) / f"{self.rig.name}-console.log"
            self._console = Console(self.rig.console.device, self.rig.console.baud, log_path=log_path,
                                    forbidden=self.rig.forbidden, name=f"console-{self.rig.name}").open()
        return self._console

    # -- transitions --------------------------------------------------------------------------------

    def _transition(self, target: ModuleState, step: Callable[[], T]) -> T:
        """Run ``step``; on any failure (Ctrl-C included) go safe before the error propagates."""
        with self._mutex:
            try:
                result = step()
            except BaseException as e:
                try:
                    self._go_off()
                except Exception as during:
                    e.add_note(f"while leaving rig {self.rig.name} safe: {during}")
                raise
            self._state = target
            self._state_file.write(relays_on=self.power.is_on or self.bootmode.usb_boot, state=target)
            return result

    def _go_off(self) -> None:
        self.bootmode.safe()
        self._state = ModuleState.OFF
        self._state_file.write(relays_on=False, state=ModuleState.OFF)

    def _power_on(self, *, usb_boot: bool, target: ModuleState, write_protect: bool | None = None) -> None:
        self._state_file.write(relays_on=True, state=target)  # before the switch: a kill may come any time
        self.bootmode.power_on(usb_boot=usb_boot, write_protect=write_protect)

    def off(self) -> None:
        with self._mutex:
            self._go_off()

    def power_on(self) -> None:
        """Switch on in eMMC boot mode and confirm nothing (``hil power on``); see :meth:`boot`."""
        if self._state is not ModuleState.OFF:
            return
        self._transition(ModuleState.POWERED,
                         lambda: self._power_on(usb_boot=False, target=ModuleState.POWERED))

    def leave_powered(self) -> None:
        """Keep the supply on after :meth:`close`, where the backend can (a released GPIO cannot)."""
        if not self.power.holds_after_exit:
            raise InputError(f"{self.power.describe()} switches off when this process lets go of it, so rig "
                             f"{self.rig.name} cannot be left powered. Fix: keep the command running",
                             stage="power")
        self._keep_power = True

    def usb_boot(self, *, write_protect: bool | None = None) -> Identity:
        """nRPI_BOOT asserted, power on, and the boot ROM proven on the rig's USB port.

        ``write_protect``: EEPROM_nWP for this boot (False releases it for an EEPROM update); None leaves
        it at its resting level. Off always puts it back."""
        if self._state is ModuleState.USB_BOOT and self.rom is not None and write_protect is None:
            return self.rom

        def step() -> Identity:
            self._go_off()
            self._power_on(usb_boot=True, target=ModuleState.USB_BOOT, write_protect=write_protect)
            self.rom = wait_for_rom(self.rig, self.rig.timeouts["rom"], self.usb_backend)
            return self.rom

        return self._transition(ModuleState.USB_BOOT, step)

    def mass_storage(self, payload: str | Path | None = None, **options: Any) -> UsbBootResult:
        """USB boot into the payload's mass-storage device (the usbboot host; its own stage timeouts)."""
        if self._state is ModuleState.MASS_STORAGE and self.usbboot is not None:
            return self.usbboot
        from hil.usbboot.host import UsbBoot

        self.usb_boot()

        def step() -> UsbBootResult:
            options.setdefault("backend", self.usb_backend)
            self.usbboot = UsbBoot.for_rig(self.rig, payload, **options).run()
            return self.usbboot

        return self._transition(ModuleState.MASS_STORAGE, step)

    def flash(self, write: Callable[[], object], *, build_id: str | None = None) -> None:
        """Run ``write`` to put an image on the eMMC: through the mass-storage device if the module is in
        that state, else with the module powered off (a native write, e.g. an eMMC programmer)."""
        if self._state is ModuleState.FLASHED and build_id is not None and build_id == self.flashed_build_id:
            return

        def step() -> None:
            if self._state is not ModuleState.MASS_STORAGE:
                self._go_off()
                self.power.wait_discharged()
            write()
            self.flashed_build_id = build_id

        self._transition(ModuleState.FLASHED, step)

    def boot(self, *, expect_build_id: str | None = None, login: bool = True) -> BootRecord:
        """Power-cycle with nRPI_BOOT released and prove over the console which build came up.

        ``expect_build_id`` defaults to the build-id given to :meth:`flash`; what the image shows at boot is
        what this process flashed, else what the last ``hil flash`` of this rig recorded."""
        expected = expect_build_id or self.flashed_build_id
        facts = self.flashed_facts or bootfacts.load(self.rig)
        check_console(self.rig, facts)  # before power-on: a silent image cannot be confirmed
        target = ModuleState.LOGGED_IN if login else ModuleState.BOOTED
        if (self._state in (ModuleState.BOOTED, ModuleState.LOGGED_IN) and self.boots
                and (expected is None or self.boots[-1].build_id == expected)
                and (not login or self._state is ModuleState.LOGGED_IN)):
            return self.boots[-1]

        def step() -> BootRecord:
            console = self.console  # open before power-on: nothing the module prints is missed
            self._go_off()
            console.skip_pending()
            start = console.mark()
            self._power_on(usb_boot=False, target=target)
            record = confirm_boot(console, self.rig, powered_at=console.now(), expect_build_id=expected,
                                  login=login, usb_fallback=self._rom_present, console_from=start, facts=facts)
            self.boots.append(record)
            return record

        return self._transition(target, step)

    def login(self) -> Console:
        """Logged in on the console (booting first if need be); returns the console to drive."""
        if self._state is not ModuleState.LOGGED_IN:
            self.boot(login=True)
        return self.console

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """A shell command on the module; its output and exit status."""
        console = self.login()
        try:
            return console.run(command, timeout=timeout or self.rig.timeouts["command"])
        except HilError:
            self._go_off()
            raise

    def _rom_present(self) -> bool:
        try:
            return find_rom(self.rig, self.usb_backend) is not None
        except Exception:  # no libusb here, or the port cannot be read: no evidence either way
            return False
