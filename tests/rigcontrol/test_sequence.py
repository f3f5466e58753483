"""The whole sequence on the virtual rig: USB boot ROM confirmed, image written, nRPI_BOOT released,
power-cycle, boot followed on the console and the build-id proven; for every module generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hil.control.lifecycle import ModuleState
from hil.errors import InfrastructureError
from hil.virtual.module import State
from hil.virtual.usb.payloads import make_payload


@pytest.mark.parametrize("model", ["cm1", "cm3", "cm4", "cm5"])
def test_full_sequence(bench: Callable[..., Any], needs_usb: None, model: str) -> None:
    b = bench(model)
    with b.lifecycle() as lc:
        rom = lc.usb_boot()
        assert (rom.vid, rom.pid, rom.stage.value) == (0x0A5C, b.rig.model.rom_pid, "rom")
        assert b.vrig.module.state is State.USB_BOOT and lc.bootmode.usb_boot
        lc.flash(b.writer("build-2"), build_id="build-2")
        assert lc.state is ModuleState.FLASHED and not b.vrig.module.powered and not lc.bootmode.usb_boot
        record = lc.boot()
        assert record.build_id == "build-2" and lc.state is ModuleState.LOGGED_IN
        milestones = ["bootloader", "kernel", "login", "shell"] if b.rig.model.has_eeprom else \
            ["kernel", "login", "shell"]
        assert list(record.markers) == milestones
        times = list(record.markers.values())
        assert times == sorted(times) and times[0] > 0
        assert lc.run("hostname").output == "raspberrypi"
        assert "Booting Linux" in lc.console.since(record.console_from)
    assert b.vrig.module.state is State.OFF
    power_ons = [e for e in b.vrig.journal.events("power") if e.what == "on"]
    assert [e.details["usb_boot"] for e in power_ons] == [True, False]


def test_transitions_are_idempotent(bench: Callable[..., Any]) -> None:
    b = bench("cm4")
    with b.lifecycle() as lc:
        lc.off()
        lc.flash(b.writer("idem"), build_id="idem")
        lc.flash(b.writer("idem"), build_id="idem")
        first = lc.boot()
        assert lc.boot() is first and lc.login() is lc.console
    assert len([e for e in b.vrig.journal.events("power") if e.what == "on"]) == 1


def test_usb_boot_without_a_rom_on_the_port_is_infrastructure(bench: Callable[..., Any]) -> None:
    b = bench("cm4", timeouts={"rom": 0.5})
    b.vrig.module.usb = None  # the USB cable is unplugged: the ROM runs but the host never sees it
    with b.lifecycle() as lc:
        try:
            lc.usb_boot()
        except InfrastructureError as e:
            assert e.stage == "usbboot.rom" and "1-1.4" in str(e)
        else:
            pytest.fail("usb_boot() succeeded without a boot ROM on the port")
        assert lc.state is ModuleState.OFF and not lc.power.is_on and not lc.bootmode.usb_boot
        assert b.vrig.module.wait_state(State.OFF, 2.0)


def test_mass_storage_then_flash_then_boot(bench: Callable[..., Any], needs_usb: None, tmp_path: Path) -> None:
    b = bench("cm4")
    payload = make_payload(tmp_path, "mass-storage-gadget64", boot_img_size=1024 * 1024)
    with b.lifecycle() as lc:
        result = lc.mass_storage(payload, settle=0.05)
        assert lc.state is ModuleState.MASS_STORAGE and result.final_identity is not None
        assert lc.mass_storage(payload) is result
        image = b.image("via-msd")

        def write() -> None:  # what the mass-storage device serves: the eMMC's block device
            with open(image.path, "rb") as src, open(b.vrig.emmc.block_device, "r+b") as dst:
                dst.write(src.read())

        lc.flash(write, build_id="via-msd")
        assert lc.power.is_on  # written through the mass-storage device: the module stayed up
        assert lc.boot().build_id == "via-msd"
