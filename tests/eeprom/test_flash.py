"""The flash flow's checks: the recovery folder is refused before the module is touched, and an update is
judged from recovery.bin's metadata against pieeprom.sig, each failure blamed on the right party."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from hil.eeprom.flash import check_payload, judge_update
from hil.errors import Fault, HilError, InputError
from hil.rig import Rig, load_rig
from hil.usbboot.host import UsbBootResult
from hil.usbboot.trace import FileServed, StageTiming, Trace
from hil.virtual.usb.payloads import make_payload

SHA = "ab" * 32


@pytest.fixture
def cm4(make_rig: Callable[..., Path]) -> Rig:
    return load_rig(make_rig("cm4"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_payload(tmp_path, "recovery", ("cm4",))


def test_a_stand_in_recovery_folder_passes(cm4: Rig, folder: Path) -> None:
    payload = check_payload(folder, cm4)
    assert payload.image_name == "pieeprom.bin" and payload.config.boot_order.value == 0xF25641
    assert payload.write_protect is None and payload.facts.stand_in


def _break(folder: Path, how: str) -> None:
    image = folder / "pieeprom.bin"
    if how == "no image":
        image.unlink()
    elif how == "wrong size":
        image.write_bytes(image.read_bytes()[:1000])
    elif how == "no sig":
        (folder / "pieeprom.sig").unlink()
    elif how == "stale sig":
        (folder / "pieeprom.sig").write_text("0" * 64 + "\nts: 1\n")
    else:
        (folder / "config.txt").write_text(how + "\n")


@pytest.mark.parametrize("how, says", [
    ("no image", "has no pieeprom.bin (or pieeprom.upd). Fix: build one with `hil eeprom build`"),
    ("wrong size", "is 1000 bytes, but a cm4 (bcm2711) bootloader image is exactly 524288 bytes"),
    ("no sig", "pieeprom.sig is missing: recovery.bin refuses to write an image without it"),
    ("stale sig", "does not match"),
    ("recovery_metadata=0", "would not report EEPROM_UPDATE and EEPROM_HASH"),
    ("eeprom_write_protect=2", "eeprom_write_protect=2 means nothing. Fix: use 1 (protect), 0 (clear) or -1"),
])
def test_a_broken_folder_is_an_input_error_naming_the_fix(cm4: Rig, folder: Path, how: str, says: str) -> None:
    _break(folder, how)
    with pytest.raises(InputError) as e:
        check_payload(folder, cm4)
    assert says in str(e.value) and "Fix:" in str(e.value) and e.value.exit_code == 2


#: usbboot's stock recovery/boot.conf settings (raspberrypi/usbboot 87d6e03): the bootloader stays silent.
STOCK_BOOT_CONF = "[all]\nBOOT_UART=0\nWAKE_ON_GPIO=1\nPOWER_OFF_ON_HALT=0\nBOOT_ORDER=0xf25641\nENABLE_SELF_UPDATE=1\n"


def test_the_stock_recovery_boot_conf_without_boot_uart_is_accepted(cm4: Rig, folder: Path) -> None:
    from hil.eeprom.build import build_update

    build_update(folder, (folder / "pieeprom.original.bin").read_bytes(), STOCK_BOOT_CONF, cm4.model)
    payload = check_payload(folder, cm4)
    assert not payload.config.boot_uart and payload.config.boot_order.value == 0xF25641


def test_stand_ins_never_go_to_real_hardware_and_eepromless_modules_are_refused(cm4: Rig, folder: Path) -> None:
    with pytest.raises(InputError, match="stand-in image; it would brick a real cm4"):
        check_payload(folder, dataclasses.replace(cm4, virtual=None))
    with pytest.raises(InputError, match="has no bootloader EEPROM"):
        check_payload(folder, dataclasses.replace(cm4, model=dataclasses.replace(cm4.model, has_eeprom=False)))


def result(metadata: dict[str, str], *, done: bool = True) -> UsbBootResult:
    stage = StageTiming("file_server", 0.0, 1.0, True, detail="done" if done else "device left: no_device")
    return UsbBootResult("12-1.4", "cm4", "recovery", [stage], Trace(), metadata,
                         [FileServed("config.txt", 10, "x"), FileServed("pieeprom.bin", 524288, "y")], None)


def judged(cm4: Rig, folder: Path, metadata: dict[str, str], *, done: bool = True,
           write_protected: bool = False) -> HilError | None:
    payload = check_payload(folder, cm4)
    payload = dataclasses.replace(payload, sig=dataclasses.replace(payload.sig, sha256=SHA))
    try:
        judge_update(result(metadata, done=done), payload, write_protected=write_protected)
    except HilError as e:
        return e
    return None


def test_success_needs_both_the_update_and_the_matching_hash(cm4: Rig, folder: Path) -> None:
    assert judged(cm4, folder, {"EEPROM_UPDATE": "success", "EEPROM_HASH": SHA.upper()}) is None
    lie = judged(cm4, folder, {"EEPROM_UPDATE": "success", "EEPROM_HASH": "cd" * 32})
    assert lie is not None and lie.fault is Fault.PRODUCT and "the EEPROM holds something else" in lie.message
    unproven = judged(cm4, folder, {"EEPROM_UPDATE": "success"})
    assert unproven is not None and unproven.fault is Fault.PRODUCT and "(none)" in unproven.message


@pytest.mark.parametrize("metadata, done, protected, fault, says", [
    ({}, False, False, Fault.INFRASTRUCTURE, "left USB port 12-1.4 before recovery.bin reported EEPROM_UPDATE"),
    ({"USER_SERIAL_NUM": "1"}, True, False, Fault.PRODUCT, "asked for config.txt, pieeprom.bin"),
    ({"EEPROM_UPDATE": "failed"}, True, True, Fault.INFRASTRUCTURE, "write-protected"),
    ({"EEPROM_UPDATE": "failed"}, True, False, Fault.PRODUCT, "with EEPROM_nWP released"),
])
def test_failures_are_classified(cm4: Rig, folder: Path, metadata: dict[str, str], done: bool, protected: bool,
                                 fault: Fault, says: str) -> None:
    error = judged(cm4, folder, metadata, done=done, write_protected=protected)
    assert error is not None and error.fault is fault and says in error.message
    assert error.stage == "eeprom.update" and error.evidence["metadata"] == metadata
