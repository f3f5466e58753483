"""Boot confirmation: which milestones each model and image show, and the lines that end the wait at once."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.control.bootconfirm import boot_markers, confirm_boot
from hil.control.console import Console
from hil.errors import InputError, ProductError
from hil.flash.bootfacts import BootFacts
from hil.rig import Rig, load_rig

REPO = Path(__file__).resolve().parents[2]
STOCK = BootFacts(serial_console=True, why_silent="", quiet=True, hostname="lab-cm4", token="t0k3n", user="hil",
                  root_partuuid="5e3da4a7-02", cmdline_root="PARTUUID=5e3da4a7-02")


def _rig(model: str = "cm4", **customise: object) -> Rig:
    rig = load_rig(REPO / "rigs" / f"virtual-{model}.toml")
    return dataclasses.replace(rig, timeouts={**rig.timeouts, "bootloader": 20, "kernel": 20, "login": 20},
                               customise=dataclasses.replace(rig.customise, **customise))


@pytest.fixture
def console() -> Iterator[Console]:
    with Console("loop://") as c:  # what is sent comes back as if the module printed it
        yield c


def test_bootloader_marker_only_with_boot_uart() -> None:
    assert [n for n, _ in boot_markers(_rig(), STOCK)] == ["login"]
    assert [n for n, _ in boot_markers(_rig(bootloader_uart=True), STOCK)] == ["bootloader", "login"]
    assert [n for n, _ in boot_markers(_rig("cm3"), STOCK)] == ["login"]  # no EEPROM bootloader at all


def test_kernel_marker_only_without_quiet() -> None:
    loud = dataclasses.replace(STOCK, quiet=False)
    assert [n for n, _ in boot_markers(_rig(), loud)] == ["kernel", "login"]
    assert [n for n, _ in boot_markers(_rig(), None)] == ["kernel", "login"]  # unknown image: the old rule


def test_login_marker_names_the_hostname() -> None:
    login = dict(boot_markers(_rig(), STOCK))["login"]
    assert login == r"^lab\-cm4 login: ?$"
    assert dict(boot_markers(_rig(), dataclasses.replace(STOCK, hostname=None)))["login"] == r"login: ?$"


def test_a_silent_image_is_refused_before_waiting(console: Console) -> None:
    silent = dataclasses.replace(STOCK, serial_console=False, why_silent="config.txt does not set enable_uart=1")
    with pytest.raises(InputError, match="serial console off.*enable_uart=1"):
        confirm_boot(console, _rig(), powered_at=console.now(), facts=silent)


@pytest.mark.parametrize("lines", [
    "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(179,2)\n",
    "[    2.0] VFS: Unable to mount root fs on unknown-block(0,0)\n",
    "Trying partition: 0\nFilesystem not found on partition 0\n",
    "Boot mode: SD (01) order f2564\nSD retry\nBoot mode: RESTART (0f) order 0\nBoot mode: SD (01) order f2564\n",
    " 85.58 [sdcard] start4.elf not found\n 85.59 [sdcard] start.elf not found\n 85.93 Firmware not found\n",
])
def test_each_fatal_line_ends_the_wait_at_once(console: Console, lines: str) -> None:
    started = time.monotonic()
    console.send(lines)
    with pytest.raises(ProductError, match="the boot cannot go on") as e:
        confirm_boot(console, _rig(), powered_at=console.now(), facts=STOCK)
    assert time.monotonic() - started < 5  # not the 20 s login timeout
    assert e.value.evidence["line"].strip() in lines


def test_an_ordinary_boot_reaches_the_login_prompt(console: Console) -> None:
    console.send("Boot mode: SD (01) order f2564\nDebian GNU/Linux 12 lab-cm4 ttyS0\n\nlab-cm4 login: ")
    record = confirm_boot(console, _rig(), powered_at=console.now(), facts=STOCK, login=False)
    assert list(record.markers) == ["login"]
