"""Fault matrix, what is flashed: something that is not a disk image (random data, a program renamed .img), a
FIFO, a .bmap with a changed checksum, a .bmap made for another image of the same size. Each is the user's input
to fix (exit 2), refused before the first byte where that can be known; never blamed on the module (exit 4)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.cli import main as hil_main
from hil.image.build import BuiltImage
from tests.faults.conftest import MassStorage, MiB, mass_storage

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("virtual_usb")]


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory, small_image: BuiltImage) -> Iterator[MassStorage]:
    for ms in mass_storage(tmp_path_factory.mktemp("images"), "fault-images", "41-1.3", (14, 15)):
        assert hil_main(["flash", str(small_image.path), "--rig", str(ms.rig.path), "--no-usbboot"]) == 0
        yield ms


def _flash(ms: MassStorage, path: Path, *extra: str) -> int:
    return hil_main(["flash", str(path), "--rig", str(ms.rig.path), "--no-usbboot", "--no-cache", *extra])


def _untouched(ms: MassStorage, capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> str:
    before = ms.emmc_sha256()
    assert _flash(ms, path, *extra) == 2
    assert ms.emmc_sha256() == before
    err = capsys.readouterr().err
    assert "/proc/" not in err
    return err


def test_random_data_is_not_written(module: MassStorage, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(10 * MiB))
    err = _untouched(module, capsys, junk)
    assert "is not a disk image" in err and "--raw" in err


def test_a_program_renamed_img_is_not_written(module: MassStorage, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    program = tmp_path / "ls.img"
    shutil.copyfile("/bin/ls", program)
    assert "is not a disk image" in _untouched(module, capsys, program)


def test_raw_writes_raw_data_on_purpose(module: MassStorage, tmp_path: Path, small_image: BuiltImage) -> None:
    junk = tmp_path / "junk.img"
    data = os.urandom(2 * MiB)
    junk.write_bytes(data)
    try:
        assert _flash(module, junk, "--raw") == 0
        with open(module.emmc, "rb") as f:
            assert f.read(len(data)) == data
    finally:
        assert _flash(module, small_image.path) == 0


def test_a_fifo_is_refused_at_once(module: MassStorage, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "image.img"
    os.mkfifo(fifo)
    assert "is a FIFO" in _untouched(module, capsys, fifo)
    assert "is a character device" in _untouched(module, capsys, Path("/dev/zero"))
    link = tmp_path / "disk.img"
    link.symlink_to(module.block_device)  # was reported as "empty"
    assert "is a block device" in _untouched(module, capsys, link)


def _bmap_copy(image: BuiltImage, folder: Path) -> tuple[Path, Path]:
    folder.mkdir()
    raw = folder / image.path.name
    shutil.copyfile(image.path, raw)
    assert image.bmap is not None
    return raw, Path(shutil.copyfile(image.bmap, folder / image.bmap.name))


def test_a_bmap_with_a_changed_range_checksum_is_refused(module: MassStorage, small_image: BuiltImage,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, bmap = _bmap_copy(small_image, tmp_path / "changed")
    text = bmap.read_text()
    digest = re.search(r'chksum="([0-9a-f]+)"', text)
    assert digest
    bmap.write_text(text.replace(digest.group(1), digest.group(1)[::-1], 1))
    assert "BmapFileChecksum" in _untouched(module, capsys, raw)


def _resealed(bmap: Path, text: str) -> None:
    """``text`` with a BmapFileChecksum that matches it, as bmaptool computes it (its own value zeroed)."""
    own = re.search(r"<BmapFileChecksum>\s*([0-9a-f]+)\s*</BmapFileChecksum>", text)
    assert own
    zeroed = text.replace(own.group(1), "0" * len(own.group(1)))
    bmap.write_text(zeroed.replace("0" * len(own.group(1)), hashlib.sha256(zeroed.encode()).hexdigest(), 1))


def test_a_resealed_bmap_with_a_wrong_checksum_fails_as_input_and_leaves_no_bootable_disk(
        module: MassStorage, small_image: BuiltImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, bmap = _bmap_copy(small_image, tmp_path / "resealed")
    text = bmap.read_text()
    digests = re.findall(r'chksum="([0-9a-f]+)"', text)
    _resealed(bmap, text.replace(digests[-1], digests[-1][::-1]))
    try:
        assert _flash(module, raw) == 2
        err = capsys.readouterr().err
        assert "do not match their sha256" in err and "marked unbootable" in err
        with open(module.emmc, "rb") as f:
            assert f.read(MiB) == bytes(MiB)
    finally:
        assert _flash(module, small_image.path) == 0


def test_a_bmap_of_another_image_of_the_same_size_is_input(module: MassStorage, small_image: BuiltImage,
                                                           other_image: BuiltImage, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert small_image.size == other_image.size and other_image.bmap is not None
    try:
        assert _flash(module, small_image.path, "--bmap", str(other_image.bmap)) == 2
        assert "belongs to another image" in capsys.readouterr().err
    finally:
        assert _flash(module, small_image.path) == 0
