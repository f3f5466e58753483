"""Fault matrix, rig files and the payload folder: nan and inf, typos in every table (the [virtual.*] ones and
[boot.markers] included), a misspelt table name, a port this host does not have, and a payload folder whose
symlink or FIFO would lead the file server out of it or hang it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hil.cli import main as hil_main
from hil.errors import InfrastructureError
from hil.models import MODELS
from hil.usbboot.fileserver import Payload
from tests.rigfiles import virtual_rig_toml


def _rig(tmp_path: Path, extra: str = "", **options: object) -> Path:
    path = tmp_path / "rig.toml"
    path.write_text(virtual_rig_toml("fault-rig", "cm4", "3-1.2", state_dir=tmp_path / "state", extra=extra,
                                     **options))  # type: ignore[arg-type]
    return path


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert hil_main(["rig", "check", "--offline", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(("extra", "key"), [
    ("[timeouts]\nrom = inf\n", "timeouts.rom"),
    ("[timeouts]\nlogin = nan\n", "timeouts.login"),
    ("[timeouts]\nkernel = 1e300\n", "timeouts.kernel"),
    ("[relays]\noff_time = nan\n", "relays.off_time"),
    ("[relays]\noff_time = inf\n", "relays.off_time"),
    ("[virtual]\nspeedup = inf\n", "virtual.speedup"),
    ("[virtual.emmc]\nwrite_mbps = nan\n", "virtual.emmc.write_mbps"),
    ("[virtual.usb]\nrequest_delay = inf\n", "virtual.usb.request_delay"),
    ("[virtual.usb]\nlate_disk = nan\n", "virtual.usb.late_disk"),
    ("[virtual.console]\nunplug_after = nan\n", "virtual.console.unplug_after"),
])
def test_nan_inf_and_absurd_numbers_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str,
                                               key: str) -> None:
    err = _check(_rig(tmp_path, extra), capsys)
    assert f"{key}:" in err


@pytest.mark.parametrize(("extra", "key", "meant"), [
    ("[virtual.usb]\nlate_dsk = 0.4\n", "virtual.usb.late_dsk", "late_disk"),
    ("[virtual.console]\nunplug_afer = 2\n", "virtual.console.unplug_afer", "unplug_after"),
    ("[boot.markers]\nkernal = 'Linux version'\n", "boot.markers.kernal", "kernel"),
    ("[consle]\nbaud = 115200\n", "consle", "console"),
    ("[virtual.emmcc]\nwrite_mbps = 1\n", "virtual.emmcc", "emmc"),
])
def test_typos_in_every_table_are_named_with_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          extra: str, key: str, meant: str) -> None:
    err = _check(_rig(tmp_path, extra), capsys)
    assert f"{key}: is not a known" in err and f"did you mean {meant!r}" in err


def test_a_marker_of_ones_own_is_still_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hil_main(["rig", "check", "--offline", str(_rig(tmp_path, "[boot.markers]\nnetwork = 'eth0: up'\n"))]) == 0
    capsys.readouterr()


def test_the_file_server_stays_inside_the_payload_folder(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:hash\n")
    payload = tmp_path / "payload"
    (payload / "2711").mkdir(parents=True)
    (payload / "2711" / "config.txt").write_bytes(b"inside")
    (payload / "link").mkdir()
    (payload / "link" / "shadow").symlink_to(secret)
    (payload / "escape").symlink_to(tmp_path)
    (payload / "alias.txt").symlink_to(payload / "2711" / "config.txt")
    os.mkfifo(payload / "fifo.bin")
    served = Payload(payload, MODELS["cm4"])
    assert served.find("link/shadow") is None
    assert served.find("escape/secret") is None
    assert served.find("fifo.bin") is None  # and did not hang
    found = served.find("alias.txt")
    assert found is not None and found.data == b"inside"


@pytest.mark.usefixtures("virtual_usb")
def test_a_port_this_host_does_not_have_is_named(tmp_path: Path) -> None:
    from hil.usbboot.host import UsbBoot
    from hil.virtual.usb.payloads import make_payload
    from hil.virtual.usb.umockdev_bus import UsbBus

    UsbBus.get()  # the process's one test bed, before libusb and the uevent monitor bind to one

    payload = make_payload(tmp_path / "payload", "mass-storage-gadget64", ("cm4",), boot_img_size=1024**2)
    with pytest.raises(InfrastructureError, match="no USB bus 97, so port 97-1.3 does not exist here"):
        UsbBoot("97-1.3", payload, MODELS["cm4"], settle=0.01, timeouts={"rom": 0.3}).run()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e999"])
def test_command_line_seconds_are_finite(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        hil_main(["usbboot", "--port", "1-1", "--settle", value])
    assert e.value.code == 2 and "invalid seconds value" in capsys.readouterr().err


def test_a_misspelt_required_key_is_named_not_reported_missing(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _rig(tmp_path)
    path.write_text(path.read_text().replace('port = "3-1.2"', 'prot = "3-1.2"'))
    err = _check(path, capsys)
    assert "usb.prot: is not a known key" in err and "did you mean 'port'" in err


@pytest.mark.parametrize(("extra", "key"), [
    ("[virtual]\nstate_dir = '/dev'\n", "virtual.state_dir"),
    ("[virtual.emmc]\nio_errors = [{offset = '63MiB', length = '2MiB'}]\n", "virtual.emmc.io_errors[0]"),
    ("[virtual.usb]\nduplicate_disk = '3-1.2'\n", "virtual.usb.duplicate_disk"),
])
def test_settings_that_point_outside_the_rig_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         extra: str, key: str) -> None:
    assert f"{key}:" in _check(_rig(tmp_path, extra), capsys)
