"""The module's power switch: a relay, a hub port switched by uhubctl, or external commands.

Every backend enforces the rig's off-time (a module switched back on too soon has not discharged and
may not reset at all) and reads back the state it set where it can, so a relay that did not click or a
hub that ignored the request fails at once instead of as a confusing boot failure later.

One lock (:attr:`PowerSwitch.lock`) guards the supply; :mod:`hil.control.bootmode` takes the same lock, so a
boot-mode line can never change between "checked" and "powered on".
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from hil.control.relays import Relay
from hil.errors import InfrastructureError, InputError
from hil.rig import Rig

STAGE = "power"


class PowerSwitch(ABC):
    #: Whether the supply stays as set after this process exits (a GPIO is released when it does).
    holds_after_exit = True

    def __init__(self, off_time: float, timeout: float):
        self.off_time = off_time
        self.timeout = timeout
        self.lock = threading.RLock()
        # The supply may have been on until a moment ago (a crashed run): count the off-time from now.
        self._last_off = time.monotonic()
        self._on = False

    @property
    def is_on(self) -> bool:
        """Read back from the backend where it can, else what was last set."""
        with self.lock:
            state = self.read()
            return self._on if state is None else state

    def on(self) -> None:
        """Apply power, first waiting out what is left of the off-time."""
        with self.lock:
            if self._on:
                return
            self.wait_discharged()
            self._switch(True)
            self._on = True
            self._check(True)

    def wait_discharged(self) -> None:
        """Return once the supply has been off for the off-time (the module has really stopped)."""
        with self.lock:
            if not self._on:
                time.sleep(max(0.0, self._last_off + self.off_time - time.monotonic()))

    def off(self) -> None:
        with self.lock:
            self._switch(False)
            if self._on:
                self._last_off = time.monotonic()
            self._on = False
            self._check(False)

    def cycle(self) -> None:
        with self.lock:
            self.off()
            self.on()

    def _check(self, want: bool) -> None:
        state = self.read()
        if state is not None and state != want:
            raise InfrastructureError(f"{self.describe()} reads back {'on' if state else 'off'} after being "
                                      f"switched {'on' if want else 'off'}. Fix: check its wiring and supply",
                                      stage=STAGE)

    @abstractmethod
    def _switch(self, on: bool) -> None: ...

    @abstractmethod
    def read(self) -> bool | None:
        """The supply's state as the backend reports it; None if it cannot tell."""

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def close(self) -> None:
        """Let go of the backend (the caller switches off first if it wants the module off)."""


class RelayPower(PowerSwitch):
    holds_after_exit = False

    def __init__(self, rig: Rig):
        super().__init__(rig.relays.off_time, rig.timeouts["power"])
        assert rig.relays.power is not None
        self._relay = Relay(rig.relays.power)

    def _switch(self, on: bool) -> None:
        self._relay.set(on)

    def read(self) -> bool:
        return self._relay.is_on

    def describe(self) -> str:
        return f"the power relay (GPIO{self._relay.line.gpio})"

    def close(self) -> None:
        self._relay.close()


def run_program(argv: tuple[str, ...] | list[str], timeout: float, stage: str, purpose: str, where: str) -> str:
    """Run a rig file's command (no shell) within ``timeout``; its output, or an InfrastructureError naming it."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise InfrastructureError(f"cannot run {argv[0]!r} {purpose}: no such program. Fix: install it or correct "
                                  f"the path in {where}", stage=stage) from None
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"{shlex.join(argv)} did not finish within {timeout:g} s", stage=stage) from None
    if done.returncode != 0:
        raise InfrastructureError(f"{shlex.join(argv)} failed (exit status {done.returncode}): "
                                  f"{(done.stderr or done.stdout).strip()[-500:]}", stage=stage)
    return done.stdout


class _ProgramPower(PowerSwitch):
    """A backend that runs programs; each gets the power stage's timeout."""

    def close(self) -> None:
        """Nothing is held between two runs of a program."""

    def _run(self, argv: tuple[str, ...] | list[str]) -> str:
        return run_program(argv, self.timeout, STAGE, f"for {self.describe()}", "the rig file's [power]")


class UhubctlPower(_ProgramPower):
    """Per-port power of a hub that really switches VBUS (uhubctl's list of supported hubs)."""

    def __init__(self, rig: Rig):
        super().__init__(rig.relays.off_time, rig.timeouts["power"])
        self.hub, self.port, self.program = rig.power.hub, rig.power.port, rig.power.program

    def _switch(self, on: bool) -> None:
        self._run([self.program, "-l", self.hub, "-p", str(self.port), "-a", "on" if on else "off"])

    def read(self) -> bool:
        out = self._run([self.program, "-l", self.hub, "-p", str(self.port)])
        # "  Port 2: 0503 power highspeed enable connect [...]" or "  Port 2: 0000 off"
        m = re.search(rf"^\s*Port {self.port}: [0-9a-f]{{4}} (\w+)", out, re.MULTILINE)
        if m is None:
            raise InfrastructureError(f"uhubctl did not report port {self.port} of hub {self.hub}. Fix: check "
                                      f"the hub location with `uhubctl` alone\n{out.strip()[-500:]}", stage=STAGE)
        return m.group(1) != "off"

    def describe(self) -> str:
        return f"hub {self.hub} port {self.port} (uhubctl)"


class CommandPower(_ProgramPower):
    """Any other switch (a smart plug, a lab PSU): commands from the rig file."""

    def __init__(self, rig: Rig):
        super().__init__(rig.relays.off_time, rig.timeouts["power"])
        self.config = rig.power

    def _switch(self, on: bool) -> None:
        self._run(self.config.on if on else self.config.off)

    def read(self) -> bool | None:
        if not self.config.status:
            return None
        answer = self._run(self.config.status).strip().lower()
        if answer in ("on", "1"):
            return True
        if answer in ("off", "0"):
            return False
        raise InfrastructureError(f"{shlex.join(self.config.status)} printed {answer[:80]!r}, not on or off. "
                                  "Fix: make the status command print on or off", stage=STAGE)

    def describe(self) -> str:
        return f"the power command {shlex.join(self.config.on)}"


def power_switch(rig: Rig) -> PowerSwitch:
    """The switch the rig file describes."""
    backends: dict[str, Callable[[Rig], PowerSwitch]] = {"relay": RelayPower, "uhubctl": UhubctlPower,
                                                         "command": CommandPower}
    if rig.power.backend not in backends:
        raise InputError(f"{rig.path}: unknown power backend {rig.power.backend!r}", stage="rig-file")
    return backends[rig.power.backend](rig)
