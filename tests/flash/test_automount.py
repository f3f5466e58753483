"""A desktop's automount of the module's own disk is undone through udisks before the guard judges it; a mount of
any other disk is never touched, and without udisks nothing is unmounted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hil.cli import main as hil_main
from hil.control.lifecycle import Lifecycle
from hil.disk.automount import undo_automounts
from hil.disk.discovery import wait_for_disk
from hil.disk.guard import guard_disk
from hil.image.build import ImageSpec, build_image
from hil.image.tools import tool_env
from hil.rig import load_rig
from tests.rigfiles import virtual_rig_toml

if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", "") or os.geteuid() != 0:
    pytest.skip("needs root and umockdev: run pytest under umockdev-wrapper as root", allow_module_level=True)

from hil.virtual.rig import VirtualRig  # noqa: E402
from hil.virtual.usb.payloads import make_payload  # noqa: E402

pytestmark = pytest.mark.timeout(120)
MiB = 1024**2


def mounts() -> str:
    return Path("/proc/self/mounts").read_text()


def test_an_automount_of_the_modules_disk_is_undone_and_another_disks_mount_is_not(tmp_path: Path) -> None:
    payload = make_payload(tmp_path / "payload", "mass-storage-gadget64", ("cm4",), boot_img_size=MiB)
    path = tmp_path / "rig.toml"
    path.write_text(virtual_rig_toml("automount", "cm4", "35-1", state_dir=tmp_path / "state", emmc="128MiB",
                                     power_gpio=20, boot_gpio=21, nwp_gpio=None, off_time=0.01, speedup=50.0,
                                     timeouts={"mass_storage": 5},
                                     extra={"usb": {"payload": str(payload)}, "virtual": {"usb": {"automount": True}}}))
    rig = load_rig(path)
    image = build_image(tmp_path / "image.img", ImageSpec(size=64 * MiB, boot_size=36 * MiB, fill=MiB)).path
    env = tool_env()
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(other)], check=True, env=env)
    loop = subprocess.run(["losetup", "--find", "--show", str(other)], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()
    (tmp_path / "other").mkdir()
    subprocess.run(["mount", loop, str(tmp_path / "other")], check=True, env=env)
    try:
        with VirtualRig(rig) as virtual:
            desktop = virtual.desktop
            assert desktop is not None
            assert hil_main(["flash", str(image), "--rig", str(rig.path), "--no-verify"]) == 0  # partitions now
            with Lifecycle(rig) as lifecycle:
                lifecycle.mass_storage(settle=0.01)
                disk = wait_for_disk(rig.usb_port, 5)
                automounted = desktop.wait_mounted(10)
                # rootfs (ext4) at least: bootfs (FAT) mounts only where the kernel has vfat
                assert automounted, virtual.journal.events("host")
                assert all(p in mounts() for p in automounted)
                path_with_udisks = os.environ["PATH"]
                os.environ["PATH"] = path_with_udisks.split(os.pathsep, 1)[1]  # a host without udisks
                try:
                    assert undo_automounts(os.stat(virtual.emmc.block_device).st_rdev) == []
                    assert all(p in mounts() for p in automounted)
                finally:
                    os.environ["PATH"] = path_with_udisks
                with guard_disk(disk, rig):
                    assert sorted(desktop.unmounted()) == sorted(automounted)
                    assert not any(p in mounts() for p in automounted)
                    assert str(tmp_path / "other") in mounts()  # another disk's mount is left alone
    finally:
        subprocess.run(["umount", str(tmp_path / "other")], check=False, env=env)
        subprocess.run(["losetup", "--detach", loop], check=False, env=env)
