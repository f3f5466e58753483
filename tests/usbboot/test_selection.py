"""Port paths and stage detection (usbboot-protocol.md section 1)."""

from __future__ import annotations

import pytest

from hil.errors import InputError
from hil.usbboot.selection import Identity, Stage
from hil.usbport import UsbPort


def test_port_path_round_trip() -> None:
    port = UsbPort("1-1.4")
    assert (port.bus, port.ports, str(port)) == (1, (1, 4), "1-1.4")
    assert UsbPort("3-2").ports == (2,)


@pytest.mark.parametrize("text", ["1", "1-", "a-1", "1-1..2", "usb1", "1-1.4 extra"])
def test_bad_port_path_is_input_error(text: str) -> None:
    with pytest.raises(InputError, match="port path"):
        UsbPort(text)


@pytest.mark.parametrize(("pid", "iserial", "stage"), [
    (0x2763, 0, Stage.ROM), (0x2764, 0, Stage.ROM), (0x2711, 3, Stage.ROM), (0x2712, 3, Stage.ROM),
    (0x2764, 1, Stage.SECOND_STAGE), (0x2711, 4, Stage.SECOND_STAGE), (0x2712, 4, Stage.SECOND_STAGE),
    (0x0001, 0, Stage.MASS_STORAGE), (0x0104, 3, Stage.MASS_STORAGE), (0x1234, 0, Stage.OTHER),
])
def test_stage_from_iserial_index(pid: int, iserial: int, stage: Stage) -> None:
    assert Identity(0x0A5C, pid, iserial, 1, 5).stage is stage
    assert Identity(0x1D6B, pid, iserial, 1, 5).stage is Stage.OTHER
