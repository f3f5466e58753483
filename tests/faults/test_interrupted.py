"""Fault matrix, an interrupted flash: Ctrl-C when most of the image is on the eMMC must leave a module that does
not boot, not one that passes ``hil boot --expect-build-id`` with a half-written image."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from hil.cli import main as hil_main
from hil.disk.discovery import wait_for_disk
from hil.disk.guard import guard_disk
from hil.flash.sources import open_image
from hil.flash.writer import write_image
from hil.image.build import BuiltImage
from tests.faults.conftest import MiB, mass_storage

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("virtual_usb")]


def test_ctrl_c_late_in_a_flash_leaves_a_module_that_does_not_boot(tmp_path: Path, small_image: BuiltImage,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    image = open_image(small_image.path, 256 * MiB, bmap=None)  # planned by its filesystems: every chunk written
    interrupted_at: list[int] = []

    def ctrl_c(position: int, size: int | None, written: int, mapped: int | None, seconds: float) -> None:
        if not interrupted_at and position >= small_image.size - 8 * MiB:  # the table and build-id went long ago
            interrupted_at.append(position)
            os.kill(os.getpid(), signal.SIGINT)

    for ms in mass_storage(tmp_path, "fault-cut", "42-1.3", (18, 23)):
        disk = wait_for_disk(ms.rig.usb_port, 5)
        with guard_disk(disk, ms.rig) as guarded, pytest.raises(KeyboardInterrupt):
            write_image(image, guarded.fd, disk.node, disk.size, progress=ctrl_c)
    assert interrupted_at
    assert hil_main(["boot", "--rig", str(ms.rig.path), "--expect-build-id", small_image.build_id]) == 4
    assert "no kernel marker" in capsys.readouterr().err
    with open(ms.emmc, "rb") as f:
        assert f.read(MiB) == bytes(MiB)  # no partition table: the first MiB comes last
