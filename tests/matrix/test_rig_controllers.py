"""Rig files that put a module's USB ports on host controllers of their own (``[virtual.usb.controllers]``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.errors import RigFileError
from hil.rig import load_rig
from hil.virtual.rig import VirtualRig
from hil.virtual.usb.hostprofiles import HYPOTHESES

REPO = Path(__file__).resolve().parents[2]

BASE = """
name = "ctl"
model = "cm1"
[emmc]
size = "64MiB"
[relays.power]
gpio = 17
[usb]
ports = ["17-1", "18-1"]
[console]
[virtual]
[virtual.usb]
full_speed = true
"""


def write(tmp_path: Path, controllers: str) -> Path:
    path = tmp_path / "ctl.toml"
    path.write_text(BASE + "[virtual.usb.controllers]\n" + controllers)
    return path


@pytest.mark.parametrize("name", ["virtual-cm1-matrix", "virtual-cm3-matrix"])
def test_matrix_rigs_have_a_lenient_and_a_hypothesis_controller(name: str) -> None:
    rig = load_rig(REPO / "rigs" / f"{name}.toml")
    assert rig.usb_ports == ("15-1", "16-1")
    assert rig.virtual is not None
    assert dict(rig.virtual.controllers) == {"15-1": "xhci-lenient", "16-1": "ehci-hypothesis-maxpacket"}
    assert dict(rig.virtual.usb) == {}  # the table is not a switch of the USB model


def test_the_hypotheses_rig_cycles_every_hypothesis() -> None:
    rig = load_rig(REPO / "rigs" / "virtual-cm1-hypotheses.toml")
    assert rig.virtual is not None and rig.model.name == "cm1"
    profiles = {text.split("-", 1)[1] for text in rig.virtual.controllers.values()}
    assert profiles == {"lenient", *HYPOTHESES}
    VirtualRig(rig, usb=False)  # every entry is a controller the virtual bus knows


def test_controllers_sit_beside_the_usb_switches(tmp_path: Path) -> None:
    rig = load_rig(write(tmp_path, '"18-1" = "ehci-hypothesis-status"\n'))
    assert rig.virtual is not None
    assert dict(rig.virtual.controllers) == {"18-1": "ehci-hypothesis-status"}
    assert dict(rig.virtual.usb) == {"full_speed": True}


@pytest.mark.parametrize(("line", "key", "fix"), [
    ('"19-1" = "xhci-lenient"\n', "virtual.usb.controllers.19-1", "17-1, 18-1"),
    ('"18-1" = 3\n', "virtual.usb.controllers.18-1", "xhci-lenient"),
    ('"18-1" = "EHCI lenient"\n', "virtual.usb.controllers.18-1", "KIND-PROFILE"),
    ('"18" = "ehci-lenient"\n', "virtual.usb.controllers.18", "quote a port"),
])
def test_bad_controller_entries_name_the_key_and_the_fix(tmp_path: Path, line: str, key: str, fix: str) -> None:
    with pytest.raises(RigFileError) as e:
        load_rig(write(tmp_path, line))
    assert e.value.key == key and fix in str(e.value)


def test_an_unknown_controller_kind_is_refused_before_the_rig_opens(tmp_path: Path) -> None:
    rig = load_rig(write(tmp_path, '"18-1" = "ehci-strict"\n'))  # the unevidenced name of old
    with pytest.raises(RigFileError) as e:
        VirtualRig(rig, usb=False)
    assert e.value.key == "virtual.usb.controllers.18-1" and "ehci-hypothesis-maxpacket" in str(e.value)
