"""The virtual CM3 under QEMU, end to end: flashed over USB mass storage, booted with a real kernel, proven over the
console; guest reboot and poweroff; a corrupted kernel is a product fault. Each QEMU boot costs 4-10 s of two
cores, so these tests boot three times in all."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hil.control.lifecycle import Lifecycle
from hil.disk.discovery import wait_for_disk
from hil.disk.guard import guard_disk
from hil.errors import InfrastructureError, ProductError
from hil.flash.sources import open_image
from hil.flash.verify import verify_written
from hil.flash.writer import write_image
from hil.image import fat
from hil.image.bootable import GuestKit, build_bootable, guest_kit
from hil.image.build import BuiltImage, ImageSpec
from hil.rig import Rig, load_rig
from hil.usbboot.host import DEFAULT_SETTLE
from hil.virtual.journal import Journal
from hil.virtual.module import State
from hil.virtual.qemu import QEMU
from hil.virtual.rig import VirtualRig
from hil.virtual.usb.payloads import make_payload

MiB = 1024**2
pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed (qemu-system-arm)")]


@pytest.fixture(scope="module")
def kit() -> GuestKit:
    try:
        return guest_kit()
    except InfrastructureError as e:
        pytest.skip(f"no guest packages: {e}")


@pytest.fixture
def rig(repo: Path) -> Rig:
    return load_rig(repo / "rigs" / "virtual-cm3-qemu.toml")


@pytest.fixture
def bootable(kit: GuestKit, tmp_path: Path) -> Callable[[str], BuiltImage]:
    def build(build_id: str) -> BuiltImage:
        spec = ImageSpec(model="cm3", size=128 * MiB, boot_size=48 * MiB, build_id=build_id)
        return build_bootable(tmp_path / f"{build_id}.img", spec, kit)

    return build


def qemu_pids(journal: Journal, what: str = "started") -> list[int]:
    return [e.details["pid"] for e in journal.events("qemu") if e.what == what]


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def test_flashed_over_usb_then_booted_with_a_real_kernel(rig: Rig, bootable: Callable[[str], BuiltImage],
                                                        tmp_path: Path) -> None:
    if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", "") or os.geteuid() != 0:
        pytest.skip("needs root and umockdev: run pytest under umockdev-wrapper as root")
    built = bootable("qemu-flow-1")
    payload = make_payload(tmp_path / "payload", "msd", ("cm3",))
    assert rig.virtual is not None
    with VirtualRig(rig) as vrig, Lifecycle(rig, log_dir=tmp_path / "logs") as lc:
        pts = os.path.realpath(rig.console.device)
        lc.mass_storage(payload, settle=DEFAULT_SETTLE / rig.virtual.speedup)
        disk = wait_for_disk(rig.usb_port, rig.timeouts["mass_storage"])

        def write() -> None:
            with guard_disk(disk, rig) as guarded:
                written = write_image(open_image(built.path, guarded.disk.size), guarded.fd, guarded.disk.node,
                                      guarded.disk.size)
                verify_written(guarded.fd, guarded.disk.node, written.written)

        lc.flash(write, build_id=built.build_id)
        record = lc.boot()  # power-cycle with nRPI_BOOT released, milestones, login, /etc/build-id
        assert record.build_id == built.build_id
        assert list(record.markers) == ["kernel", "build_id", "login", "shell"]
        assert "Raspberry Pi Compute Module 3" in lc.run("cat /proc/device-tree/model; echo").output
        assert lc.run("awk '$2 == \"/\" { print $1 }' /proc/mounts").output.strip() == "/dev/mmcblk0p2"
        [first] = qemu_pids(vrig.journal)
        assert vrig.module.state is State.RUNNING

        # The guest reboots: the SoC resets, the firmware reads the eMMC again, a new QEMU boots it.
        console = lc.console
        console.send_line("reboot")
        booted = console.expect(rig.markers["build_id"], rig.timeouts["login"], stage="test.reboot")
        assert booted.group(1) == built.build_id
        console.login(timeout=rig.timeouts["login"], login_prompt=rig.markers["login"])
        first_gone, second = qemu_pids(vrig.journal, "stopped"), qemu_pids(vrig.journal)[-1]
        assert first_gone == [first] and second != first and not alive(first)

        # The guest powers off: QEMU ends by itself and the module stays halted until power is cycled.
        console.send_line("poweroff")
        assert vrig.module.wait_state(State.HALTED, rig.timeouts["login"])
        assert not alive(second)
        assert os.path.realpath(rig.console.device) == pts  # the same console device across every power-on

    events = vrig.journal.events()
    msd = max(e.t for e in events if e.kind == "stage" and e.what == "mass-storage")
    cut = min(e.t for e in events if e.kind == "power" and e.what == "off" and e.t > msd)
    assert all(e.t > cut for e in events if e.kind == "qemu"), "QEMU ran while the eMMC was a USB disk"


def test_a_corrupted_kernel_fails_the_boot_as_a_product_fault(rig: Rig, bootable: Callable[[str], BuiltImage],
                                                              kit: GuestKit, tmp_path: Path) -> None:
    built = bootable("qemu-bad-kernel")
    kernel = bytearray(kit.boot["kernel8.img"].read_bytes())
    kernel[: 1 * MiB] = os.urandom(1 * MiB)  # the header and the first instructions
    fat.write_file(built.path, built.layout.partition(1), "kernel8.img", bytes(kernel))
    rig = dataclasses.replace(rig, timeouts={**rig.timeouts, "kernel": 8.0})  # earlycon: a good one talks in ~1 s
    with VirtualRig(rig, usb=False) as vrig, Lifecycle(rig, log_dir=tmp_path / "logs") as lc:

        def write() -> None:
            with open(built.path, "rb") as src, open(vrig.emmc.image_path, "r+b") as dst:
                shutil.copyfileobj(src, dst, 4 * MiB)

        lc.flash(write, build_id=built.build_id)
        with pytest.raises(ProductError) as failed:
            lc.boot()
        assert failed.value.stage == "boot.kernel"
        assert "no kernel marker" in str(failed.value) and "(nothing received)" in str(failed.value)
        [pid] = qemu_pids(vrig.journal)
        assert vrig.module.wait_state(State.OFF, 10)  # the failed boot left the rig safe: QEMU is gone
        assert not alive(pid)
