"""The virtual module's boot of a stock-shaped Raspberry Pi OS image, read straight from its output: the factory
bootloader is silent, ``quiet`` hides the kernel, the console needs enable_uart, a CM5's console is UART10 unless
``dtparam=uart0_console`` moves it, and the first boot honours userconf.txt the way userconf-pi does."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.image import ext4, fat
from hil.image.mbr import read_layout
from hil.models import MODELS
from hil.virtual import firmware
from hil.virtual.eeprom import VirtualEeprom
from hil.virtual.journal import Journal
from tests.stockimage import build_stock_image


def _boot(image: Path, model: str, *, uart: str = "", boot_uart: bool = False) -> tuple[str, firmware.Outcome]:
    m = MODELS[model]
    loader = VirtualEeprom(m, None, Journal(), boot_uart=boot_uart).bootloader() if m.has_eeprom else None
    log = firmware.boot(m, image, 0x12345678, loader, uart=uart)
    text = []
    while True:
        try:
            text.append(next(log).text)
        except StopIteration as end:
            return "".join(text), end.value


def _edit(image: Path, name: str, edit: str, append: bool = True) -> None:
    boot = read_layout(image).partitions[0]
    old = (fat.read_file(image, boot, name) or b"").decode()
    fat.write_file(image, boot, name, ((old.rstrip("\n") + " " if append and name == "cmdline.txt" else old)
                                       + edit).encode())


def test_stock_image_as_it_comes_stays_silent(tmp_path: Path) -> None:
    image = build_stock_image(tmp_path / "s.img", "cm4").path
    text, outcome = _boot(image, "cm4")
    assert text == ""  # factory BOOT_UART=0, no enable_uart: nothing at all on the UART
    assert isinstance(outcome, firmware.Stuck) and "serial console" in outcome.why


def test_enable_uart_gives_a_quiet_boot_then_the_getty(tmp_path: Path) -> None:
    image = build_stock_image(tmp_path / "s.img", "cm4").path
    _edit(image, "config.txt", "enable_uart=1\n")
    text, outcome = _boot(image, "cm4")
    assert isinstance(outcome, firmware.System)
    assert "Booting Linux" not in text and "RPi: BOOTLOADER" not in text  # quiet, and BOOT_UART=0
    assert outcome.issue.startswith("Debian GNU/Linux 12 raspberrypi ttyS0")
    loud, _ = _boot(image, "cm4", boot_uart=True)
    assert "RPi: BOOTLOADER release" in loud and "Booting Linux" not in loud


def test_cm5_console_is_uart10_unless_moved(tmp_path: Path) -> None:
    image = build_stock_image(tmp_path / "s.img", "cm5").path
    _edit(image, "config.txt", "enable_uart=1\n")
    _, on_uart10 = _boot(image, "cm5", uart="uart10")
    assert isinstance(on_uart10, firmware.System) and on_uart10.tty == "ttyAMA10"
    _, on_uart0 = _boot(image, "cm5", uart="uart0")  # the adapter on GPIO14/15 hears nothing
    assert isinstance(on_uart0, firmware.Stuck)
    _edit(image, "config.txt", "dtparam=uart0_console\n")
    _, moved = _boot(image, "cm5", uart="uart0")
    assert isinstance(moved, firmware.System) and moved.tty == "ttyAMA0"


@pytest.mark.parametrize("model", ["cm3", "cm4", "cm5"])
def test_first_boot_takes_userconf_and_custom_toml_once(tmp_path: Path, model: str) -> None:
    image = build_stock_image(tmp_path / "s.img", model).path
    _edit(image, "config.txt", "enable_uart=1\n")
    boot, root = read_layout(image).partitions
    fat.write_file(image, boot, "userconf.txt", b"pi-user:$6$salt$hash\n")
    fat.write_file(image, boot, "custom.toml", b'config_version = 1\n[system]\nhostname = "bench-7"\n')
    _, outcome = _boot(image, model)
    assert isinstance(outcome, firmware.System) and outcome.hostname == "bench-7"
    assert fat.read_file(image, boot, "userconf.txt") is None and fat.read_file(image, boot, "custom.toml") is None
    shadow = (ext4.read_file(image, root, "/etc/shadow") or b"").decode()
    assert "pi-user:$6$salt$hash:" in shadow and shadow.startswith("root:*:")  # root stays locked
    assert "sudo:x:27:pi-user" in (ext4.read_file(image, root, "/etc/group") or b"").decode()
    assert outcome.read("/boot/firmware/issue.txt") is not None  # the boot partition, where Bookworm mounts it
