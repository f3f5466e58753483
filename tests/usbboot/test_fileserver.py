"""File lookup as rpiboot's check_file does it (usbboot-protocol.md 4.3), and the payload's own checks."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from hil.errors import InputError
from hil.models import MODELS
from hil.usbboot.fileserver import Payload, parse_metadata


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "2711").mkdir()
    (tmp_path / "config.txt").write_bytes(b"top")
    (tmp_path / "cmdline.txt").write_bytes(b"top cmdline")
    (tmp_path / "2711" / "config.txt").write_bytes(b"overlay")
    _tar(tmp_path / "bootfiles.bin", {"2711/bootcode4.bin": b"bc4", "2711/Config.txt": b"tar config",
                                      "2711/cmdline.txt": b"tar cmdline", "2712/bootcode5.bin": b"bc5"})
    return tmp_path


def test_lookup_order_chip_folder_then_bootfiles_then_folder(folder: Path) -> None:
    payload = Payload(folder, MODELS["cm4"])
    found = payload.find("config.txt")
    assert found is not None and found.data == b"overlay"  # <dir>/2711 overlays bootfiles.bin
    found = payload.find("cmdline.txt")
    assert found is not None and (found.data, found.source) == (b"tar cmdline", "bootfiles.bin:2711/cmdline.txt")
    assert payload.second_stage().data == b"bc4"
    (folder / "2711" / "config.txt").unlink()
    found = payload.find("CONFIG.TXT")  # tar members match case-insensitively
    assert found is not None and found.data == b"tar config"


def test_other_chip_sees_its_own_member_and_the_folder(folder: Path) -> None:
    payload = Payload(folder, MODELS["cm5"])
    assert payload.second_stage().data == b"bc5"
    found = payload.find("config.txt")
    assert found is not None and found.data == b"top"


def test_parent_paths_are_refused_and_absolute_names_stay_inside(folder: Path, tmp_path: Path) -> None:
    secret = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    secret.write_bytes(b"no")
    try:
        payload = Payload(folder, MODELS["cm4"])
        assert payload.find(f"../{secret.name}") is None
        assert payload.find("2711/../config.txt") is None
        assert payload.find(str(secret)) is None
        found = payload.find("/cmdline.txt")
        assert found is not None and found.data == b"tar cmdline"
        assert payload.find("") is None
    finally:
        secret.unlink()


def test_missing_second_stage_names_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "bootcode.bin").write_bytes(b"x")
    with pytest.raises(InputError) as e:
        Payload(tmp_path, MODELS["cm4"]).second_stage()
    assert "bootcode4.bin" in str(e.value) and str(tmp_path) in str(e.value)
    assert Payload(tmp_path, MODELS["cm1"]).second_stage().data == b"x"


def test_missing_folder_and_broken_bootfiles_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Payload(tmp_path / "nope", MODELS["cm4"])
    (tmp_path / "bootfiles.bin").write_bytes(b"not a tar" * 100)
    with pytest.raises(InputError, match="bootfiles.bin"):
        Payload(tmp_path, MODELS["cm4"])


def test_recovery_payload_is_recognised(tmp_path: Path) -> None:
    assert not Payload(tmp_path, MODELS["cm4"]).is_recovery
    (tmp_path / "pieeprom.sig").write_text("abc\nts: 1\n")
    assert Payload(tmp_path, MODELS["cm4"]).is_recovery


@pytest.mark.parametrize(("name", "item"), [
    ("*EEPROM_UPDATE*success", ("EEPROM_UPDATE", "success")),
    ("*MAC_ADDR*d8:3a:dd:01:02:03", ("MAC_ADDR", "d8:3a:dd:01:02:03")),
    ("**KEY**VALUE*", ("KEY", "VALUE")),
    ("*KEY", None),
])
def test_metadata_parsing(name: str, item: tuple[str, str] | None) -> None:
    assert parse_metadata(name) == item
