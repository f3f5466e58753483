"""Proving how the relay lines rest once no process drives them.

gpiozero's ``close()`` turns a line into an input (lgpio: no pull; pigpio: the default pull), so when the
framework's process exits the power relay, nRPI_BOOT and EEPROM_nWP follow the relay board's pull resistors
(real-hardware-review.md, "gpiozero on a controller Pi"). The rig file says what each line then does
(``rest = "off"``/``"on"`` under ``[relays.LINE]``); :func:`check_rest` proves it: a child process drives every
line away from its declared rest and exits as any framework process does, then each line is read as an input
with no pull of ours, which is the level the board's resistors give it. Reading a line claims it as an input,
so a line the kernel kept driving after the child's exit reads as its pull, not as that drive.

``python -m hil.control.restcheck RIG`` is that child.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hil.control.relays import Relay, pin_factory
from hil.errors import InfrastructureError
from hil.hostenv import outside_umockdev
from hil.rig import RelayLine, Rig, load_rig

STAGE = "selfcheck.rest"
CHILD_TIMEOUT = 30.0
FIX = ("wire the relay board so that the line's resistor de-energises the relay with the GPIO undriven (README, "
       "\"Relay lines at rest\"), correct rest = \"off\"/\"on\" in the rig file, or keep a long-lived holder of the "
       "lines")


def read_rest(line: RelayLine) -> bool:
    """Whether ``line``'s relay is energised with the GPIO read as an input and no pull of ours."""
    from gpiozero import InputDevice

    try:
        device = InputDevice(line.gpio, pull_up=None, active_state=line.active_high,
                             pin_factory=pin_factory(line.pin_factory))
    except InfrastructureError:
        raise
    except Exception as e:
        raise InfrastructureError(f"cannot read GPIO{line.gpio} ({line.role}) as an input: {e}", stage=STAGE) from e
    try:
        return bool(device.value)
    finally:
        device.close()


def rest_states(rig: Rig) -> dict[str, bool]:
    """Each relay line's state (energised?) after a child process that drove it away from rest has exited.

    The caller must not hold the lines (see :meth:`hil.control.lifecycle.Lifecycle.lines_released`)."""
    argv = [sys.executable, "-m", "hil.control.restcheck", str(rig.path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=outside_umockdev(),
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"the relay-holding child did not exit within {CHILD_TIMEOUT:g} s",
                                  stage=STAGE) from None
    if done.returncode != 0:
        raise InfrastructureError(f"the relay-holding child failed (exit {done.returncode}): "
                                  f"{done.stderr.strip()[-500:]}", stage=STAGE)
    return {line.role: read_rest(line) for line in rig.relays.lines()}


def check_rest(rig: Rig) -> dict[str, bool]:
    """Raise InfrastructureError naming each line that does not rest as the rig file says; else the states."""
    states = rest_states(rig)
    wrong = [line for line in rig.relays.lines() if states[line.role] != line.rest_on]
    if wrong:
        what = "; ".join(f"{line.role} (GPIO{line.gpio}) rests {'on' if states[line.role] else 'off'}, the rig file "
                         f"says {'on' if line.rest_on else 'off'}" for line in wrong)
        raise InfrastructureError(f"with no process driving them: {what}. Fix: {FIX}", stage=STAGE, rest=states)
    return states


def _hold_then_exit(path: str) -> None:
    """The child: drive each line away from its declared rest, then exit as a framework process does."""
    rig = load_rig(Path(path), check_devices=False)
    held = [Relay(line, initially_on=not line.rest_on) for line in rig.relays.lines()]
    for relay in held:
        relay.close()  # what gpiozero does to every device at interpreter exit: the line becomes an input


if __name__ == "__main__":
    _hold_then_exit(sys.argv[1])
