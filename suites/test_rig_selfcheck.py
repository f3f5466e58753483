"""Rig self-check: the rig can switch the module, see its boot ROM on the right port and hear its console.

These run first on each rig. A rig that fails one is taken out of the run (its other tests are skipped
with the reason), so a broken cable costs one failure in the morning's report, not fifty.
"""

from __future__ import annotations

import allure
import pytest

from hil.control.bootmode import BootMode
from hil.control.console import Console
from hil.control.lifecycle import Lifecycle
from hil.control.restcheck import check_rest
from hil.errors import Fault
from hil.rig import Rig

pytestmark = pytest.mark.selfcheck


def test_power_switch_toggles(lifecycle: Lifecycle) -> None:
    lifecycle.off()
    with allure.step(f"switch on: {lifecycle.power.describe()}"):
        lifecycle.power_on()
        assert lifecycle.power.is_on
    with allure.step("switch off"):
        lifecycle.off()
        assert not lifecycle.power.is_on


def test_relay_lines_rest_as_the_rig_file_says(lifecycle: Lifecycle, rig: Rig) -> None:
    """After a process that drove them exits, each relay line does what ``rest`` says (the board's pulls), so
    "off" needs no running process."""
    if not rig.relays.lines():
        pytest.skip("no relay lines")
    with allure.step("release the lines; a child process drives them away from rest and exits; read them"), \
            lifecycle.lines_released():
        states = check_rest(rig)
    allure.attach("".join(f"{role}  {'on' if on else 'off'}\n" for role, on in states.items()),
                  name="relay lines at rest", attachment_type=allure.attachment_type.TEXT)


@pytest.mark.needs("nrpi_boot")
def test_boot_mode_line_toggles(lifecycle: Lifecycle, boot_mode: BootMode) -> None:
    lifecycle.off()
    for usb_boot in (True, False):
        with allure.step(f"nRPI_BOOT {'asserted' if usb_boot else 'released'}"):
            boot_mode.set(usb_boot=usb_boot)
            assert boot_mode.usb_boot is usb_boot


@pytest.mark.needs("eeprom_nwp")
def test_eeprom_write_protect_line_toggles(lifecycle: Lifecycle, boot_mode: BootMode, rig: Rig) -> None:
    lifecycle.off()
    for protect in (not rig.relays.nwp_protect_at_rest, rig.relays.nwp_protect_at_rest):
        with allure.step(f"EEPROM_nWP {'pulled low (protected)' if protect else 'released'}"):
            boot_mode.set(write_protect=protect)
            assert boot_mode.write_protected is protect


@pytest.mark.needs("nrpi_boot")
def test_boot_rom_appears_on_the_rig_port(lifecycle: Lifecycle, rig: Rig) -> None:
    with allure.step(f"power on with nRPI_BOOT asserted; boot ROM on USB port {rig.usb_port}"):
        rom = lifecycle.usb_boot()
        allure.attach(str(rom), name="boot ROM", attachment_type=allure.attachment_type.TEXT)
    lifecycle.off()
    assert (rom.vid, rom.pid) == (0x0A5C, rig.model.rom_pid)


@pytest.mark.needs("eeprom")
def test_console_is_alive(lifecycle: Lifecycle, console: Console, rig: Rig) -> None:
    """The EEPROM bootloader prints its banner at every power-on, whatever the eMMC holds, where its config says
    BOOT_UART=1 (``[customise] bootloader_uart``); the factory config (BOOT_UART=0) keeps it silent."""
    if not rig.customise.bootloader_uart:
        pytest.skip("the module's bootloader config keeps the UART silent (BOOT_UART=0, the factory default): the "
                    "console is proven by the boot test instead")
    lifecycle.off()
    console.skip_pending()
    with allure.step(f"power on; bootloader banner on {console.device}"):
        lifecycle.power_on()
        console.expect(rig.markers["bootloader"], rig.timeouts["bootloader"], stage="selfcheck.console",
                       fault=Fault.INFRASTRUCTURE, what="bootloader banner")
    lifecycle.off()
