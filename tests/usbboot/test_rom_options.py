"""The rig file's USB boot leniency (``[usb] rom_retries``, ``signed_boot``) reaches the USB boot host."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.errors import RigFileError
from hil.rig import load_rig
from hil.usbboot.host import DEFAULT_ROM_RETRIES, UsbBoot
from tests.rigfiles import virtual_rig_toml


def rig_file(tmp_path: Path, usb: str) -> Path:
    path = tmp_path / "rig.toml"
    path.write_text(virtual_rig_toml("opts", "cm3", "9-1", extra=f"[usb]\n{usb}"))
    return path


def test_defaults_and_rig_settings_reach_the_host(tmp_path: Path) -> None:
    rig = load_rig(rig_file(tmp_path, ""))
    host = UsbBoot.for_rig(rig, tmp_path)
    assert (host.rom_retries, host.signed) == (DEFAULT_ROM_RETRIES, False)
    rig = load_rig(rig_file(tmp_path, "rom_retries = 5\nsigned_boot = true\n"))
    host = UsbBoot.for_rig(rig, tmp_path)
    assert (host.rom_retries, host.signed) == (5, True)
    assert UsbBoot.for_rig(rig, tmp_path, rom_retries=0).rom_retries == 0  # a command line wins


@pytest.mark.parametrize(("usb", "key"), [("rom_retries = -1\n", "usb.rom_retries"),
                                          ("rom_retries = 1.5\n", "usb.rom_retries"),
                                          ('signed_boot = "yes"\n', "usb.signed_boot")])
def test_bad_settings_name_the_key(tmp_path: Path, usb: str, key: str) -> None:
    with pytest.raises(RigFileError) as e:
        load_rig(rig_file(tmp_path, usb))
    assert e.value.key == key
