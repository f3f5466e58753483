"""The virtual module's EEPROM: persisted, protected as a W25 part with /WP, torn by a power cut, and what its
bootloader prints and tries, following the stored BOOT_ORDER."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from hil.eeprom.pieeprom import image_facts, read_config
from hil.models import MODELS
from hil.virtual import firmware
from hil.virtual.eeprom import FACTORY, FACTORY_CONFIG, LATEST, VirtualEeprom, release_image
from hil.virtual.journal import Journal
from hil.virtual.usb.payloads import make_payload

CM4, CM5 = MODELS["cm4"], MODELS["cm5"]


class Cut(Exception):
    pass


def cut_after(n: int):
    """A ``wait`` that lets ``n`` waits pass and then loses power."""
    calls = itertools.count(1)

    def wait(seconds: float) -> None:
        if next(calls) > n:
            raise Cut

    return wait


def no_wait(seconds: float) -> None:
    pass


def latest(model=CM4, order: str = "0xf21") -> bytes:
    return release_image(model, LATEST[model.name], f"BOOT_UART=1\nBOOT_ORDER={order}\n")


def test_a_fresh_eeprom_holds_the_factory_bootloader_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "state" / "eeprom.bin"
    eeprom = VirtualEeprom(CM4, path, Journal())
    loader = eeprom.bootloader()
    assert loader is not None and loader.version == FACTORY["cm4"].version
    assert read_config(path.read_bytes(), CM4) == FACTORY_CONFIG["cm4"]
    assert eeprom.update(latest(), 1.6, no_wait) == "success"
    again = VirtualEeprom(CM4, path, Journal()).bootloader()
    assert again is not None and again.version == LATEST["cm4"].version and again.config.boot_order.value == 0xF21


def test_protect_bits_bite_only_while_nwp_is_low(tmp_path: Path) -> None:
    pin = {"low": False}
    journal = Journal()
    eeprom = VirtualEeprom(CM5, tmp_path / "eeprom.bin", journal, lambda: pin["low"])
    assert eeprom.set_protect_bits("1") and eeprom.protect_bits and not eeprom.write_protected
    assert eeprom.update(latest(CM5), 14.0, no_wait) == "success"  # /WP high: the status register lets it be
    pin["low"] = True
    assert eeprom.write_protected
    before = eeprom.contents()
    assert eeprom.update(latest(CM5, "0xf1"), 14.0, no_wait) == "write-protected" and eeprom.contents() == before
    assert not eeprom.set_protect_bits("0") and eeprom.protect_bits  # the status register is locked too
    assert eeprom.set_protect_bits(None) and eeprom.set_protect_bits("-1")  # "leave as is" always works
    assert VirtualEeprom(CM5, tmp_path / "eeprom.bin", Journal()).protect_bits  # kept across power cycles
    pin["low"] = False
    assert eeprom.set_protect_bits("0") and not eeprom.protect_bits
    assert [e.what for e in journal.events("fault")] == ["EEPROM write-protected", "status register locked"]


@pytest.mark.parametrize("waits", [0, 1, 2, 17, 31])
def test_a_power_cut_before_the_read_back_leaves_no_bootloader(waits: int) -> None:
    journal = Journal()
    eeprom = VirtualEeprom(CM4, None, journal)
    eeprom.update(latest(), 1.6, no_wait)  # the same release again: most blocks are rewritten identically
    with pytest.raises(Cut):
        eeprom.update(latest(order="0xf14"), 1.6, cut_after(waits))
    assert eeprom.bootloader() is None and not eeprom.writing.is_set()
    assert journal.events("eeprom")[-1].what == "update interrupted"
    assert eeprom.update(latest(), 1.6, no_wait) == "success" and eeprom.bootloader() is not None


def test_a_power_cut_during_the_read_back_leaves_the_new_bootloader_unreported() -> None:
    eeprom = VirtualEeprom(CM4, None, Journal())
    with pytest.raises(Cut):
        eeprom.update(latest(order="0xf14"), 1.6, cut_after(32))
    loader = eeprom.bootloader()
    assert loader is not None and loader.config.boot_order.value == 0xF14


def test_an_image_of_another_size_fails_verification() -> None:
    eeprom = VirtualEeprom(CM4, None, Journal())
    assert eeprom.update(latest(CM5), 1.6, no_wait) == "verify-failed"
    assert eeprom.bootloader() is not None


def uart(model, loader: firmware.Bootloader | None, lines: int, tmp_path: Path) -> tuple[str, object]:
    """What the UART shows of a boot from a blank eMMC, up to ``lines`` "Boot mode:" lines, and how it ended."""
    log = firmware.boot(model, tmp_path / "blank.img", 0x1234, loader)
    text, outcome = "", None
    try:
        while text.count("Boot mode:") < lines:
            text += next(log).text
    except StopIteration as end:
        outcome = end.value
    return text, outcome


def loader(model, order: str) -> firmware.Bootloader:
    found = VirtualEeprom(model, None, Journal())
    found.update(latest(model, order), 1.0, no_wait)
    result = found.bootloader()
    assert result is not None
    return result


@pytest.mark.parametrize("model, order, modes", [
    (CM4, "0xf2", ["NETWORK", "RESTART", "NETWORK", "RESTART", "NETWORK", "RESTART"]),
    (CM4, "0xf15", ["BCM-USB-MSD", "SD", "RESTART", "BCM-USB-MSD", "SD", "RESTART"]),
    (CM5, "0xf14", ["USB-MSD", "SD", "RESTART", "USB-MSD", "SD", "RESTART"]),
    (CM5, "0xf1", ["SD", "RESTART", "SD", "RESTART", "SD", "RESTART"]),
])
def test_the_bootloader_walks_the_stored_boot_order(model, order: str, modes: list[str], tmp_path: Path) -> None:
    stamped, _ = uart(model, loader(model, order), 6, tmp_path)
    text = re.sub(r"(?m)^ *\d+\.\d\d ", "", stamped)  # each line follows the seconds since power-on
    assert stamped.startswith("  0.35 RPi: BOOTLOADER")
    assert text.startswith(f"RPi: BOOTLOADER release VERSION:{LATEST[model.name].version} ")
    assert f"BUILD_TIMESTAMP={LATEST[model.name].timestamp}" in text
    walked = [line.split()[2] for line in text.splitlines() if line.startswith("Boot mode:")]
    assert walked == modes
    first = next(line for line in text.splitlines() if line.startswith("Boot mode:"))
    assert first.endswith(f"order {order[2:-1]}")  # the first mode, then the rest of BOOT_ORDER
    assert ("SD HOST" in text) is ("SD" in modes)  # network-first never touches the eMMC


def test_stop_ends_the_walk(tmp_path: Path) -> None:
    text, outcome = uart(CM4, loader(CM4, "0xe2"), 99, tmp_path)
    assert text.count("Boot mode:") == 2 and isinstance(outcome, firmware.Stuck)


def test_without_a_valid_bootloader_the_uart_stays_silent_and_the_rom_waits_on_usb(tmp_path: Path) -> None:
    text, outcome = uart(CM4, None, 1, tmp_path)
    assert text == "" and isinstance(outcome, firmware.UsbFallback)


@pytest.mark.parametrize("model, kind", [(CM4, "recovery"), (CM5, "recovery5")])
def test_stand_in_recovery_folders_carry_a_newer_release_and_usbboots_boot_conf(model, kind: str,
                                                                                tmp_path: Path) -> None:
    folder = make_payload(tmp_path, kind, (model.name,))
    image = (folder / "pieeprom.bin").read_bytes()
    assert image_facts(image).version == LATEST[model.name].version
    assert read_config(image, model) == (folder / "boot.conf").read_text()
    assert read_config((folder / "pieeprom.original.bin").read_bytes(), model) == FACTORY_CONFIG[model.name]
