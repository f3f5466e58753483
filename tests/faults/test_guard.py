"""Fault matrix, wrong-disk guard: a partition of the module's disk mounted through a loop device (which lsblk
does not show as its child and which claims nothing), a bare loop device over it, and a holder (device-mapper).
``hil flash`` must refuse each before a byte is written."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.cli import main as hil_main
from hil.image.build import BuiltImage
from hil.image.tools import tool_env
from tests.faults.conftest import MassStorage, mass_storage

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("virtual_usb")]


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory, small_image: BuiltImage) -> Iterator[MassStorage]:
    for ms in mass_storage(tmp_path_factory.mktemp("guard"), "fault-guard", "40-1.3", (2, 3)):
        assert hil_main(["flash", str(small_image.path), "--rig", str(ms.rig.path), "--no-usbboot"]) == 0
        yield ms


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=tool_env()).stdout.strip()


@contextlib.contextmanager
def _loop(device: str, offset: int) -> Iterator[str]:
    loop = _sh("losetup", "--find", "--show", "--offset", str(offset), device)
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "--detach", loop], env=tool_env(), check=False)


def _refused(ms: MassStorage, image: BuiltImage, capsys: pytest.CaptureFixture[str], check: str) -> None:
    before = ms.emmc_sha256()
    assert hil_main(["flash", str(image.path), "--rig", str(ms.rig.path), "--no-usbboot"]) == 3
    assert f"check '{check}'" in capsys.readouterr().err
    assert ms.emmc_sha256() == before


def test_a_partition_mounted_through_a_loop_device_is_refused(module: MassStorage, small_image: BuiltImage,
                                                               other_image: BuiltImage, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = small_image.layout.partition(2)
    (tmp_path / "mnt").mkdir()
    with _loop(module.block_device, root.start) as loop:
        _sh("mount", "-o", "ro", loop, str(tmp_path / "mnt"))  # ro: the eMMC must stay byte for byte the same
        try:
            assert (tmp_path / "mnt" / "etc" / "build-id").read_text().strip() == small_image.build_id
            _refused(module, other_image, capsys, "loop device")
        finally:
            _sh("umount", str(tmp_path / "mnt"))


def test_a_bare_loop_device_over_the_disk_is_refused(module: MassStorage, other_image: BuiltImage,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with _loop(module.block_device, 0):
        _refused(module, other_image, capsys, "loop device")


def test_a_holder_of_the_disk_or_a_partition_is_refused(module: MassStorage) -> None:
    """device-mapper, LVM and md show as holders in sysfs (this kernel may lack device-mapper, so the host's
    view is given): a holder of a partition is enough."""
    from hil.disk.discovery import wait_for_disk
    from hil.disk.guard import BlockDevice, GuardRefusal, HostView, check_holders

    disk = wait_for_disk(module.rig.usb_port, 5)
    sdb, sdb2, sdc = os.makedev(8, 16), os.makedev(8, 18), os.makedev(8, 32)
    view = HostView(rdev=sdb, block=[BlockDevice("sdb", sdb, None, ()), BlockDevice("sdb2", sdb2, "sdb", ("dm-0",)),
                                     BlockDevice("sdc", sdc, None, ("md0",))])
    with pytest.raises(GuardRefusal, match=r"check 'holders'.*/dev/sdb2 is held by /dev/dm-0"):
        check_holders(disk, module.rig, view)
    view.block[1] = BlockDevice("sdb2", sdb2, "sdb", ())
    check_holders(disk, module.rig, view)  # another disk's holder is not ours


def test_the_disk_in_use_after_the_guard_is_refused_before_the_first_write(
        module: MassStorage, other_image: BuiltImage) -> None:
    """A loop device set up between the guard's first look and the write: check_still_same sees it."""
    from hil.disk.discovery import wait_for_disk
    from hil.disk.guard import GuardRefusal, check_still_same, guard_disk

    disk = wait_for_disk(module.rig.usb_port, 5)
    with guard_disk(disk, module.rig) as guarded, _loop(module.block_device, 0), \
            pytest.raises(GuardRefusal, match="check 'loop device'"):
        check_still_same(guarded, module.rig)
