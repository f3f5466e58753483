"""``hil eeprom build|flash|show``: exit 2 for bad input before a module is touched, and a whole update."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hil.cli import main
from hil.virtual.eeprom import LATEST
from hil.virtual.usb.payloads import make_payload


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_payload(tmp_path, "recovery", ("cm4",))


def test_build_then_show_the_image(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "boot.conf"
    conf.write_text("[all]\nBOOT_UART=1\nBOOT_ORDER=0xf15\n")
    out = tmp_path / "out"
    assert main(["eeprom", "build", "--model", "cm4", "--image", str(folder / "pieeprom.original.bin"),
                 "--config", str(conf), "--out", str(out), "--timestamp", "7"]) == 0
    assert (out / "pieeprom.sig").read_text().endswith("\nts: 7\n")
    assert main(["eeprom", "show", "--image", str(out / "pieeprom.bin")]) == 0
    shown = capsys.readouterr().out
    assert f"cm4 bootloader VERSION {LATEST['cm4'].version}" in shown and "(cm-hil stand-in)" in shown
    assert "BOOT_ORDER 0xf15 (BCM-USB-MSD -> SD CARD -> RESTART)" in shown


@pytest.mark.parametrize("args, says", [
    (["build", "--model", "cm5", "--image", "{folder}/pieeprom.original.bin", "--config", "{conf}", "--out", "{out}"],
     "is 524288 bytes (that is the size of a 2711 image), but a cm5"),
    (["build", "--model", "cm4", "--image", "{folder}/pieeprom.original.bin", "--config", "{conf}", "--out", "{out}"],
     "BOOT_ORDR: is not a bootloader setting"),
    (["show", "--image", "{folder}/config.txt"], "the size of no bootloader image"),
    (["build", "--model", "cm4", "--image", "{folder}/nothing.bin", "--config", "{conf}", "--out", "{out}"],
     "cannot read the image"),
])
def test_bad_input_exits_2_with_the_fix(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        args: list[str], says: str) -> None:
    conf = tmp_path / "boot.conf"
    conf.write_text("BOOT_ORDR=0xf41\n" if "cm4" in args else "BOOT_ORDER=0xf41\n")
    filled = [a.format(folder=folder, conf=conf, out=tmp_path / "out") for a in args]
    assert main(["eeprom", *filled]) == 2
    err = capsys.readouterr().err
    assert says in err and "Fix:" in err
    assert not (tmp_path / "out").exists()


def test_flash_with_a_stale_sig_exits_2_without_powering_the_module(
        make_rig: Callable[..., Path], folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "pieeprom.sig").write_text("0" * 64 + "\nts: 1\n")
    assert main(["eeprom", "flash", "--rig", str(make_rig("cm4", "eeprom-cli-stale")), "--payload", str(folder)]) == 2
    assert "does not match" in capsys.readouterr().err


@pytest.mark.usefixtures("virtual_usb")
def test_flash_a_virtual_cm5_and_show_what_it_runs(make_rig: Callable[..., Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rig = str(make_rig("cm5", "eeprom-cli"))
    folder = make_payload(tmp_path, "recovery5", ("cm5",))
    report = tmp_path / "result.json"
    assert main(["eeprom", "flash", "--rig", rig, "--payload", str(folder), "--settle", "0.05",
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["metadata"]["EEPROM_UPDATE"] == "success" and result["boot_order"] == "0xf2461"
    assert result["banner"]["version"] == LATEST["cm5"].version
    assert main(["eeprom", "show", "--rig", rig]) == 0
    assert f"bootloader VERSION {LATEST['cm5'].version}" in capsys.readouterr().out


@pytest.mark.usefixtures("virtual_usb")
def test_flash_a_virtual_cm4_with_the_stock_recovery_boot_conf(make_rig: Callable[..., Path], folder: Path,
                                                               tmp_path: Path) -> None:
    """usbboot's recovery/boot.conf has BOOT_UART=0: the update is judged by recovery.bin's metadata and no
    bootloader banner is waited for."""
    conf = tmp_path / "boot.conf"
    conf.write_text("[all]\nBOOT_UART=0\nWAKE_ON_GPIO=1\nPOWER_OFF_ON_HALT=0\nBOOT_ORDER=0xf25641\n"
                    "ENABLE_SELF_UPDATE=1\n")
    assert main(["eeprom", "build", "--model", "cm4", "--image", str(folder / "pieeprom.original.bin"),
                 "--config", str(conf), "--out", str(folder)]) == 0
    report = tmp_path / "result.json"
    assert main(["eeprom", "flash", "--rig", str(make_rig("cm4", "eeprom-cli-stock")), "--payload", str(folder),
                 "--settle", "0.05", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["metadata"]["EEPROM_UPDATE"] == "success" and result["banner"] is None
    assert any("BOOT_UART off" in note for note in result["notes"])
