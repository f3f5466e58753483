"""Relay lines at rest: what each line does once no process drives it, declared in the rig file and proved
after a child process that drove the lines has exited (the virtual relay board models the pulls)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.control.lifecycle import Lifecycle
from hil.control.restcheck import check_rest
from hil.errors import InfrastructureError, RigFileError
from hil.rig import load_rig
from hil.virtual.rig import VirtualRig
from tests.rigfiles import virtual_rig_toml

# GPIOs of this file only: the mock pin factory is the process's one relay board
GPIOS = {"power_gpio": 7, "boot_gpio": 8, "nwp_gpio": 9}


def rig_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "rest.toml"
    path.write_text(virtual_rig_toml("rest", "cm4", "30-1", state_dir=tmp_path / "state", **GPIOS, extra=extra))
    return path


def test_lines_that_rest_as_declared_pass(tmp_path: Path) -> None:
    rig = load_rig(rig_file(tmp_path))
    assert [line.rest_on for line in rig.relays.lines()] == [False, False, False]
    with VirtualRig(rig, usb=False) as vrig, Lifecycle(rig) as lc:
        with lc.lines_released():
            assert check_rest(rig) == {"power": False, "nrpi_boot": False, "eeprom_nwp": False}
            assert not vrig.module.powered
        lc.power_on()  # the lines are taken back
        assert vrig.module.powered
        lc.off()


def test_a_board_that_energises_a_line_at_rest_is_caught_and_really_switches(tmp_path: Path) -> None:
    """The rig says power rests off, but the modelled board's pull energises it: once the framework lets go of the
    line the module is powered with nobody holding anything, and the self-check says so."""
    rig = load_rig(rig_file(tmp_path, "[virtual.relays]\npower = \"on\"\n"))
    with VirtualRig(rig, usb=False) as vrig, Lifecycle(rig) as lc:
        with lc.lines_released():
            with pytest.raises(InfrastructureError) as e:
                check_rest(rig)
            assert vrig.module.powered
        power = [e.details["energised"] for e in vrig.journal.events("relay") if e.what == "power"]
        assert power[-2:] == [True, False]  # energised by the pull alone, then taken back and made safe
    assert e.value.stage == "selfcheck.rest"
    assert "power (GPIO7) rests on, the rig file says off" in str(e.value) and "Relay lines at rest" in str(e.value)
    assert e.value.evidence["rest"] == {"power": True, "nrpi_boot": False, "eeprom_nwp": False}


def test_a_declared_on_rest_of_an_active_low_line_is_read_as_on(tmp_path: Path) -> None:
    extra = ("[relays.nrpi_boot]\nactive_high = false\nrest = \"on\"\n"
             "[virtual.relays]\nnrpi_boot = \"on\"\n")
    rig = load_rig(rig_file(tmp_path, extra))
    with VirtualRig(rig, usb=False), Lifecycle(rig) as lc, lc.lines_released():
        assert check_rest(rig)["nrpi_boot"] is True


@pytest.mark.parametrize(("extra", "key"), [("[relays.power]\nrest = \"floating\"\n", "relays.power.rest"),
                                            ("[virtual.relays]\nfan = \"on\"\n", "virtual.relays.fan")])
def test_bad_rest_settings_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(RigFileError) as e:
        load_rig(rig_file(tmp_path, extra))
    assert e.value.key == key
