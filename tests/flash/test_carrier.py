"""The guard on real carriers: only a Raspberry Pi mass-storage identity is the module's disk, sized as the rig's
declared eMMC; on a carrier with NVMe (mass-storage-gadget64 exports both) the eMMC is written and the NVMe named
and left alone, unless the rig says to write the NVMe."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.cli import main as hil_main
from hil.disk.carrier import size_ok
from hil.disk.discovery import Disk, choose, wait_for_disk
from hil.disk.guard import GuardRefusal, guard_disk
from hil.image.build import ImageSpec, build_image
from hil.models import MODELS
from hil.rig import Rig, load_rig
from tests.rigfiles import virtual_rig_toml

if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", "") or os.geteuid() != 0:
    pytest.skip("needs root and umockdev: run pytest under umockdev-wrapper as root", allow_module_level=True)

from hil.virtual.journal import Journal  # noqa: E402
from hil.virtual.rig import VirtualRig  # noqa: E402
from hil.virtual.timing import DeviceClock  # noqa: E402
from hil.virtual.usb.descriptors import device_descriptor, msd_descriptors  # noqa: E402
from hil.virtual.usb.device import BlockChild  # noqa: E402
from hil.virtual.usb.massstorage import MassStorage  # noqa: E402
from hil.virtual.usb.payloads import make_payload  # noqa: E402
from hil.virtual.usb.switches import DeviceEnv, default_switches  # noqa: E402
from hil.virtual.usb.umockdev_bus import UsbBus  # noqa: E402

pytestmark = pytest.mark.timeout(90)
MiB = 1024**2
EMMC = 128 * MiB


def make_rig(tmp_path: Path, name: str, port: str, gpios: tuple[int, int], **extra: object) -> Rig:
    """Own buses (31-34) and GPIOs (10, 11, 24, 25) for this file: the bus and the mock pins are the process's."""
    payload = make_payload(tmp_path / "payload", "mass-storage-gadget64", ("cm4",), boot_img_size=MiB)
    path = tmp_path / f"{name}.toml"
    path.write_text(virtual_rig_toml(name, "cm4", port, state_dir=tmp_path / "state", emmc=f"{EMMC // MiB}MiB",
                                     power_gpio=gpios[0], boot_gpio=gpios[1], nwp_gpio=None, off_time=0.01,
                                     timeouts={"mass_storage": 5}, speedup=50.0,
                                     extra={"usb": {"payload": str(payload), **extra.get("usb", {})},  # type: ignore[dict-item]
                                            "virtual": {"usb": extra.get("virtual_usb", {})}}))
    return load_rig(path)


@pytest.fixture
def stick(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A USB stick (SanDisk 0781:5581) with a medium the size of the rig's eMMC, on port 31-1."""
    backing = tmp_path / "stick.img"
    with open(backing, "wb") as f:
        f.truncate(EMMC)
    port = UsbBus.get().port("31-1")
    env = DeviceEnv(MODELS["cm4"], default_switches(MODELS["cm4"]), DeviceClock(50.0), Journal(), "5a5a5a5a")
    descriptors = dataclasses.replace(msd_descriptors(), device=device_descriptor(0x5581, 0, vid=0x0781),
                                      strings={1: "SanDisk", 2: "Cruzer Blade"})
    port.attach(MassStorage(env, descriptors, (BlockChild(str(backing), EMMC, "SanDisk", "Cruzer Blade"),)))
    yield "31-1", backing
    port.detach()


def test_a_same_size_usb_stick_on_the_rigs_port_is_refused(tmp_path: Path, stick: tuple[str, Path]) -> None:
    port, backing = stick
    rig = make_rig(tmp_path, "carrier-stick", port, (10, 11))
    disk = wait_for_disk(port, 5)
    assert (disk.usb_id, disk.size, disk.port) == ("0781:5581", EMMC, port)
    with pytest.raises(GuardRefusal) as e:
        guard_disk(disk, rig)
    assert e.value.check == "usb identity" and "0781:5581" in str(e.value) and "0a5c:0104" in str(e.value)


def test_a_cm4_with_nvme_flashes_its_emmc_and_leaves_the_nvme_alone(tmp_path: Path) -> None:
    image = build_image(tmp_path / "image.img", ImageSpec(size=64 * MiB, boot_size=36 * MiB, fill=MiB)).path
    rig = make_rig(tmp_path, "carrier-nvme", "32-1", (24, 25), virtual_usb={"nvme": "64MiB"})
    nvme = rig.virtual.state_dir / "nvme.img"  # type: ignore[union-attr]
    with VirtualRig(rig) as virtual:
        assert hil_main(["flash", str(image), "--rig", str(rig.path), "--no-verify"]) == 0
        assert virtual.emmc.read(0, 512) == image.read_bytes()[:512]
        assert nvme.read_bytes().count(0) == 64 * MiB  # never written
    nvme_rig = make_rig(tmp_path, "carrier-nvme", "32-1", (24, 25), virtual_usb={"nvme": "64MiB"},
                        usb={"disk": "nvme"})
    with VirtualRig(nvme_rig) as virtual:
        before = virtual.emmc.read(512, MiB)
        assert hil_main(["flash", str(image), "--rig", str(nvme_rig.path), "--no-verify"]) == 0
        assert nvme.read_bytes()[:512] == image.read_bytes()[:512]
        assert virtual.emmc.read(512, MiB) == before


def test_the_emmc_is_chosen_by_identity_and_the_guard_refuses_the_other_disk(tmp_path: Path) -> None:
    def disk(node: str, vendor: str, size: int) -> Disk:
        return Disk(node, "/sys/x", "33-1", size, vendor, "", "usb", None, None, "0a5c:0104")

    emmc, nvme = disk("/dev/sdx", "mmcblk0", EMMC), disk("/dev/sdy", "nvme0n1", 8 * EMMC)
    chosen = choose([nvme, emmc])
    assert chosen is not None and chosen.node == "/dev/sdx"
    assert chosen.others == ("/dev/sdy (nvme0n1, 1073741824 bytes)",)
    assert choose([nvme, emmc], "nvme").node == "/dev/sdy"  # type: ignore[union-attr]
    assert choose([disk("/dev/sdx", "Generic", EMMC), disk("/dev/sdy", "Generic", EMMC)]) is None
    rig = make_rig(tmp_path, "carrier-which", "33-1", (10, 11))
    with pytest.raises(GuardRefusal) as e:
        guard_disk(nvme, rig)
    assert e.value.check == "which disk" and 'disk = "nvme"' in str(e.value)


def test_size_is_checked_against_the_declared_emmc_with_a_tolerance(tmp_path: Path) -> None:
    real = dataclasses.replace(make_rig(tmp_path, "carrier-size", "34-1", (10, 11)), virtual=None,
                               emmc_size=32 * 1000**3)
    assert size_ok(real, 31_268_536_320)  # a 32 GB CM4 eMMC's user area
    assert not size_ok(real, 7_818_182_656)  # an 8 GB eMMC is a CM4 size, but not this rig's
    assert not size_ok(real, 32 * 1000**3 + 512) and not size_ok(real, 26 * 1000**3)
