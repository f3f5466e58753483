"""A real rig's matrix without re-cabling: ``[usb.select]`` commands move the module between its ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.control.usbselect import command_cable
from hil.errors import InfrastructureError, InputError, RigFileError
from hil.rig import load_rig
from tests.hilrun import hil

REAL = """
name = "lab"
model = "cm4"
[emmc]
size = "32GB"
[relays.power]
gpio = 17
[relays.nrpi_boot]
gpio = 27
[usb]
ports = ["1-1.3", "2-1"]
[console]
device = "/dev/null"
"""


def real_rig(tmp_path: Path, select: str = "") -> Path:
    path = tmp_path / "lab.toml"
    path.write_text(REAL + (f"[usb.select]\n{select}" if select else ""))
    return path


def test_each_port_runs_its_select_command(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    rig = load_rig(real_rig(tmp_path, f'"1-1.3" = ["touch", "{marks}/a"]\n"2-1" = "touch {marks}/b"\n'))
    assert dict(rig.usb_select) == {"1-1.3": ("touch", f"{marks}/a"), "2-1": ("touch", f"{marks}/b")}
    cable = command_cable(rig, rig.usb_ports)
    assert cable is not None
    cable("2-1")
    assert [p.name for p in marks.iterdir()] == ["b"]
    cable("1-1.3")
    assert sorted(p.name for p in marks.iterdir()) == ["a", "b"]


def test_a_failing_select_command_is_an_infrastructure_error(tmp_path: Path) -> None:
    rig = load_rig(real_rig(tmp_path, '"1-1.3" = ["false"]\n"2-1" = ["true"]\n'))
    cable = command_cable(rig, rig.usb_ports)
    assert cable is not None
    with pytest.raises(InfrastructureError) as e:
        cable("1-1.3")
    assert e.value.stage == "matrix.select" and "false failed" in str(e.value)


def test_one_port_needs_no_command_and_several_need_one_each(tmp_path: Path) -> None:
    rig = load_rig(real_rig(tmp_path, '"1-1.3" = ["true"]\n'))
    with pytest.raises(InputError, match=r"port 2-1: no \[usb.select\]"):
        command_cable(rig, rig.usb_ports)
    assert command_cable(load_rig(real_rig(tmp_path)), ["2-1"]) is None


def test_select_for_an_unlisted_port_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(RigFileError) as e:
        load_rig(real_rig(tmp_path, '"3-1" = ["true"]\n'))
    assert e.value.key == "usb.select.3-1"


def test_hil_matrix_refuses_several_unswitched_ports_before_touching_anything(tmp_path: Path) -> None:
    done = hil("matrix", "--rig", str(real_rig(tmp_path)), "--reports", str(tmp_path / "reports"))
    assert done.returncode == 2, done.stderr
    assert "[usb.select]" in done.stderr and not (tmp_path / "reports").exists()
