"""Without running QEMU: the firmware's part the rig plays for it, the rig file's boot engine, the bootable image's
contents and the guest package fetch's idempotency."""

from __future__ import annotations

import gzip
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hil.errors import InfrastructureError, InputError, RigFileError
from hil.image import ext4, fat
from hil.image.bootable import MODULES, GuestKit, build_bootable, guest_kit
from hil.image.build import BuiltImage, ImageSpec, build_image
from hil.models import MODELS
from hil.rig import load_rig
from hil.virtual import firmware
from hil.virtual.qemu import Handover, hand_over

MiB = 1024**2
CM3 = MODELS["cm3"]


def stand_in(tmp_path: Path, **changes: Any) -> BuiltImage:
    spec = ImageSpec(model="cm3", size=64 * MiB, boot_size=36 * MiB, build_id="handover")
    return build_image(tmp_path / "cm3.img", replace(spec, **changes))


def handover(image: BuiltImage) -> Handover:
    result = hand_over(CM3, image.path)
    assert isinstance(result, Handover), result
    return result


def test_firmware_hands_over_kernel_dtb_auto_initramfs_and_cmdline(tmp_path: Path) -> None:
    image = stand_in(tmp_path)
    boot = image.layout.partition(1)
    fat.write_file(image.path, boot, "initramfs8", b"an initramfs")  # config.txt says auto_initramfs=1
    h = handover(image)
    assert h.kernel == fat.read_file(image.path, boot, "kernel8.img")
    assert h.dtb == fat.read_file(image.path, boot, "bcm2710-rpi-cm3.dtb")
    assert h.initramfs == b"an initramfs" and h.uart
    assert h.cmdline.startswith("console=ttyAMA0,115200 console=tty1 ")  # serial0 is the CM3's PL011
    assert f"root=PARTUUID={image.disk_id:08x}-02" in h.cmdline


def test_config_txt_names_the_initramfs_and_turns_the_uart_off(tmp_path: Path) -> None:
    image = stand_in(tmp_path, config=("initramfs initrd.gz followkernel", "enable_uart=0"))
    fat.write_file(image.path, image.layout.partition(1), "initrd.gz", b"named")
    h = handover(image)
    assert h.initramfs == b"named" and not h.uart


def test_without_an_initramfs_the_kernel_gets_none(tmp_path: Path) -> None:
    assert handover(stand_in(tmp_path)).initramfs is None


@pytest.mark.parametrize("config, why", [(("kernel=missing.img",), "no missing.img"),
                                         (("device_tree=missing.dtb",), "missing.dtb is missing")])
def test_a_missing_kernel_or_device_tree_stops_the_boot(tmp_path: Path, config: tuple[str, ...], why: str) -> None:
    result = hand_over(CM3, stand_in(tmp_path, config=config).path)
    assert isinstance(result, firmware.Stuck) and why in result.why


def test_a_broken_device_tree_stops_the_boot(tmp_path: Path) -> None:
    image = stand_in(tmp_path)
    fat.write_file(image.path, image.layout.partition(1), "bcm2710-rpi-cm3.dtb", b"\0" * 4096)
    result = hand_over(CM3, image.path)
    assert isinstance(result, firmware.Stuck) and "not a device tree" in result.why


def test_a_blank_emmc_sends_the_rom_to_usb_boot(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(MiB))
    assert isinstance(hand_over(CM3, blank), firmware.UsbFallback)


# -- the rig file -------------------------------------------------------------------------------------------

RIG = """
model = "{model}"
[emmc]
size = "{size}"
[relays.power]
gpio = 17
[usb]
port = "1-1.6"
[console]
[virtual]
boot_engine = "{engine}"
"""


@pytest.mark.parametrize("model, size, engine, key", [
    ("cm4", "512MiB", "qemu", "virtual.boot_engine"),
    ("cm3", "300MiB", "qemu", "emmc.size"),
    ("cm3", "512MiB", "kvm", "virtual.boot_engine"),
])
def test_rig_file_boot_engine_is_checked(tmp_path: Path, model: str, size: str, engine: str, key: str) -> None:
    path = tmp_path / "rig.toml"
    path.write_text(RIG.format(model=model, size=size, engine=engine))
    with pytest.raises(RigFileError) as refused:
        load_rig(path)
    assert refused.value.key == key


def test_the_qemu_rig_file_loads(repo: Path) -> None:
    rig = load_rig(repo / "rigs" / "virtual-cm3-qemu.toml")
    assert rig.virtual is not None and rig.virtual.boot_engine == "qemu"
    assert rig.emmc_size & (rig.emmc_size - 1) == 0 and rig.model.name == "cm3"
    plain = load_rig(repo / "rigs" / "virtual-cm3.toml")
    assert plain.virtual is not None and plain.virtual.boot_engine == "model"


# -- the bootable image ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kit() -> GuestKit:
    try:
        return guest_kit()
    except InfrastructureError as e:
        pytest.skip(f"no guest packages: {e}")


def test_bootable_image_holds_kernel_initramfs_and_a_busybox_root(kit: GuestKit, tmp_path: Path) -> None:
    spec = ImageSpec(model="cm3", size=128 * MiB, boot_size=48 * MiB, build_id="bootable-1")
    image = build_bootable(tmp_path / "b.img", spec, kit)
    boot, root = image.layout.partition(1), image.layout.partition(2)
    kernel = fat.read_file(image.path, boot, "kernel8.img")
    assert kernel is not None and kernel[0x38:0x3C] == b"ARM\x64"  # a real arm64 Image
    h = handover(image)
    assert h.initramfs is not None and "earlycon" in h.cmdline.split()
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(h.initramfs), capture_output=True,
                             check=True).stdout.decode().split()
    assert "init" in listing and "bin/busybox" in listing
    assert {f"lib/modules/{Path(m).name}.ko" for m in MODULES} <= set(listing)
    assert ext4.read_file(image.path, root, "/etc/build-id") == b"bootable-1\n"
    init = ext4.read_file(image.path, root, "/sbin/init")  # a link to busybox, for arm64
    assert init is not None and init[:4] == b"\x7fELF" and int.from_bytes(init[18:20], "little") == 183
    inittab = ext4.read_file(image.path, root, "/etc/inittab")
    assert inittab is not None and b"getty -L 115200 ttyAMA0" in inittab


def test_bootable_image_is_made_for_a_cm3_only(kit: GuestKit, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cm3"):
        build_bootable(tmp_path / "cm4.img", ImageSpec(model="cm4"), kit)


def test_guest_fetch_does_nothing_once_cached(repo: Path, tmp_path: Path) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    for name in ("linux-image-6.1.0-99-arm64_6.1.1-1_arm64.deb", "busybox-static_1%3a1.35.0-4_arm64.deb",
                 "linux-image-6.1.0-99-amd64_6.1.1-1_amd64.deb", "busybox-static_1%3a1.35.0-4_amd64.deb",
                 "linux-headers-6.1.0-99-amd64_6.1.1-1_amd64.deb", "linux-headers-6.1.0-99-common_6.1.1-1_all.deb",
                 "linux-kbuild-6.1_6.1.1-1_amd64.deb", "linux-source-6.1_6.1.1-1_all.deb"):
        (debs / name).write_bytes(b"")
    done = subprocess.run([repo / "scripts" / "fetch-guest.sh"], env={"HIL_GUEST_CACHE": str(tmp_path),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "already cached" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debs"]  # no apt lists fetched
