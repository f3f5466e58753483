"""Moving a real module's USB connection between host ports without re-cabling.

A rig that lists several ``[usb] ports`` can say, per port, the command that connects the module's USB slave
port to it (``[usb.select]``): a USB switch's tool, or ``uhubctl`` switching the port power of the hub ports in
front of each host port. ``hil matrix`` runs it before the attempts on that port.
"""

from __future__ import annotations

from collections.abc import Callable

from hil.control.power import run_program
from hil.errors import InputError
from hil.rig import Rig
from hil.usbport import UsbPort

STAGE = "matrix.select"
SELECT_TIMEOUT = 30.0  # s per select command


def command_cable(rig: Rig, ports: tuple[str, ...] | list[str]) -> Callable[[str], None] | None:
    """The rig's select commands as a cable mover for ``ports``; None when one port needs no moving.

    Raises InputError (before anything is touched) when several ports are asked for and one has no command."""
    if len(ports) <= 1 and not rig.usb_select:
        return None
    missing = [p for p in ports if p not in rig.usb_select]
    if missing:
        raise InputError(f"rig {rig.name} cannot move its module to port {', '.join(missing)}: no [usb.select] "
                         f"command. Fix: add \"{missing[0]}\" = [\"program\", \"arg\", ...] under [usb.select] in "
                         f"{rig.path} (a USB switch or uhubctl), or run `hil matrix --port PORT` once per port, "
                         "moving the cable in between", stage="matrix")

    def cable(port: str) -> None:
        command = rig.usb_select.get(UsbPort(port))
        if command is not None:
            run_program(command, SELECT_TIMEOUT, STAGE, f"to connect the module to USB port {port}",
                        f"[usb.select] of {rig.path}")

    return cable
