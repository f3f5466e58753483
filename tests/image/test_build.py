"""``hil image build`` and build_image: what lands in each partition, compressed copies, broken variants."""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from hil.cli import main
from hil.errors import InfrastructureError, InputError, ProductError
from hil.image import ext4, fat
from hil.image.bootfs import ARM64_MAGIC, BOOT_FILES, FDT_MAGIC, ZIMAGE_MAGIC
from hil.image.build import FILL_PATH, BuiltImage, ImageSpec, MiB, build_image, minimum_size
from hil.image.mbr import read_layout
from hil.models import MODELS

SMALL = ImageSpec(size=56 * MiB, boot_size=33 * MiB)
TEST_TOOL = {"xz": "xz", "gz": "gzip", "zst": "zstd", "bz2": "bzip2"}


def _boot(img: BuiltImage, name: str) -> bytes | None:
    return fat.read_file(img.path, img.layout.partition(1), name)


def _root(img: BuiltImage, path: str) -> bytes | None:
    return ext4.read_file(img.path, img.layout.partition(2), path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_module_model_has_boot_files() -> None:
    assert BOOT_FILES.keys() == MODELS.keys()


@pytest.mark.parametrize("model", list(BOOT_FILES))
def test_boot_partition_holds_what_the_models_firmware_loads(model: str, tmp_path: Path) -> None:
    img = build_image(tmp_path / "x.img", replace(SMALL, model=model, disk_id=0x0BADCAFE))
    files = BOOT_FILES[model]
    boot = img.layout.partition(1)
    assert fat.fat_type(img.path, boot) == "FAT32"
    for name in files.firmware:
        assert _boot(img, name)
    others = {"bootcode.bin", "start.elf", "start4.elf", "fixup.dat", "fixup4.dat"} - set(files.firmware)
    assert all(_boot(img, name) is None for name in others)
    kernel = _boot(img, files.kernel) or b""
    if files.arm64:
        assert kernel[0x38:0x3C] == ARM64_MAGIC
        assert struct.unpack_from("<Q", kernel, 16)[0] == len(kernel)
    else:
        assert struct.unpack_from("<I", kernel, 0x24)[0] == ZIMAGE_MAGIC
    dtb = _boot(img, files.dtb) or b""
    magic, total = struct.unpack_from(">II", dtb)
    assert (magic, total) == (FDT_MAGIC, len(dtb))
    assert files.title.encode() in dtb
    config = (_boot(img, "config.txt") or b"").decode().splitlines()
    assert "enable_uart=1" in config
    assert ("arm_64bit=1" in config) == files.arm64
    assert _boot(img, "cmdline.txt") == (b"console=serial0,115200 console=tty1 root=PARTUUID=0badcafe-02 "
                                         b"rootfstype=ext4 fsck.repair=yes rootwait\n")


def test_root_filesystem_says_who_it_is_and_lets_root_in(tmp_path: Path) -> None:
    img = build_image(tmp_path / "x.img", replace(SMALL, build_id="BUILD-7", hostname="cm4-sim"))
    assert img.build_id == "BUILD-7"
    assert _root(img, "/etc/build-id") == b"BUILD-7\n"
    assert _root(img, "/etc/hostname") == b"cm4-sim\n"
    assert b'VERSION="12 (bookworm)"' in (_root(img, "/etc/os-release") or b"")
    assert (_root(img, "/etc/passwd") or b"").startswith(b"root:x:0:0:")
    assert (_root(img, "/etc/shadow") or b"").startswith(b"root::")
    assert b"BUILD-7" in (_root(img, "/etc/issue") or b"")
    assert f"PARTUUID={img.disk_id:08x}-02".encode() in (_root(img, "/etc/fstab") or b"")


def test_extra_config_and_kernel_arguments(tmp_path: Path) -> None:
    img = build_image(tmp_path / "x.img", replace(SMALL, uart=False, config=("dtoverlay=dwc2", "gpu_mem=16"),
                                                    cmdline=("quiet", "init=/bin/sh")))
    config = (_boot(img, "config.txt") or b"").decode().splitlines()
    assert config[-2:] == ["dtoverlay=dwc2", "gpu_mem=16"]
    assert "enable_uart=1" not in config
    assert (_boot(img, "cmdline.txt") or b"").endswith(b" rootwait quiet init=/bin/sh\n")


def test_default_image_is_256_mib_and_sparse(tmp_path: Path) -> None:
    img = build_image(tmp_path / "x.img", ImageSpec())
    assert img.size == 256 * MiB == img.layout.partitions[-1].end
    assert img.layout.partition(1).size == 64 * MiB
    assert img.path.stat().st_blocks * 512 < 8 * MiB
    assert img.sha256 == _sha256(img.path)


def test_fill_maps_incompressible_data(tmp_path: Path) -> None:
    img = build_image(tmp_path / "x.img", ImageSpec(fill=6 * MiB, size=64 * MiB, boot_size=33 * MiB))
    data = _root(img, "/" + FILL_PATH) or b""
    assert len(data) == 6 * MiB
    assert len(gzip.compress(data[:MiB], 1)) > MiB * 0.99
    assert img.path.stat().st_blocks * 512 > 6 * MiB


def test_compressed_copies_decompress_to_the_image_and_bmap_maps_it(tmp_path: Path) -> None:
    img = build_image(tmp_path / "x.img", replace(SMALL, compress=("xz", "gz", "zst", "bz2"), bmap=True))
    assert img.outputs == [img.path, *(tmp_path / f"x.img.{f}" for f in ("xz", "gz", "zst", "bz2")),
                           tmp_path / "x.img.bmap"]
    for fmt, path in img.compressed.items():
        out = subprocess.run([TEST_TOOL[fmt], "-dc", path], capture_output=True, check=True).stdout
        assert hashlib.sha256(out).hexdigest() == img.sha256, fmt
    blocks = subprocess.run(["xz", "--robot", "-l", img.compressed["xz"]], capture_output=True, text=True,
                            check=True).stdout
    assert int(next(line.split()[2] for line in blocks.splitlines() if line.startswith("totals"))) > 1
    assert img.bmap is not None
    bmap = ET.parse(img.bmap)
    assert int(bmap.findtext("ImageSize") or 0) == img.size
    ranges = [r.text.strip() for r in bmap.iter("Range") if r.text]
    first_fat_block = img.layout.partition(1).start // 4096
    assert ranges[0].split("-")[0] == "0"  # the partition table
    assert any(int(r.split("-")[0]) <= first_fat_block <= int(r.split("-")[-1]) for r in ranges)
    assert 0 < int(bmap.findtext("MappedBlocksCount") or 0) < img.size // 4096 // 4


@pytest.mark.parametrize("broken, formats", [("corrupt", ("xz", "gz", "zst", "bz2")),
                                             ("truncated", ("xz", "zst"))])
def test_broken_compressed_copies_fail_their_check(broken: str, formats: tuple[str, ...],
                                                   tmp_path: Path) -> None:
    img = build_image(tmp_path / "x.img", replace(SMALL, compress=formats, broken=broken))
    assert img.broken == broken
    read_layout(img.path)  # the raw image stays intact: it is the reference
    for fmt, path in img.compressed.items():
        check = subprocess.run([TEST_TOOL[fmt], "-t", path], capture_output=True)
        assert check.returncode != 0, f"{path.name} passed its integrity check"


def test_broken_raw_images(tmp_path: Path) -> None:
    cut = build_image(tmp_path / "cut.img", replace(SMALL, broken="truncated"))
    root = cut.layout.partition(2)
    assert root.start < cut.size < root.end
    with pytest.raises(ProductError, match="beyond the end of the disk"):
        read_layout(cut.path)
    garbage = build_image(tmp_path / "garbage.img", replace(SMALL, broken="corrupt"))
    with pytest.raises(ProductError, match="no partition table"):
        read_layout(garbage.path)
    assert garbage.sha256 == _sha256(garbage.path)


def test_oversize_image_is_a_valid_image_larger_than_the_emmc(tmp_path: Path) -> None:
    img = build_image(tmp_path / "big.img", replace(SMALL, broken="oversize", emmc_size=100 * MiB))
    assert img.size > 100 * MiB
    assert read_layout(img.path).partitions[-1].end == img.size
    assert _root(img, "/etc/build-id") == f"{img.build_id}\n".encode()


def test_minimum_size_is_exact_enough_to_build(tmp_path: Path) -> None:
    spec = ImageSpec(boot_size=33 * MiB, fill=24 * MiB, size=0)
    img = build_image(tmp_path / "x.img", replace(spec, size=minimum_size(spec)))
    assert len(_root(img, "/" + FILL_PATH) or b"") == 24 * MiB


def test_cli_builds_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.img"
    assert main(["image", "build", str(out), "--model", "cm5", "--size", "56MiB", "--boot-size", "33MiB",
                 "--build-id", "CLI-1", "--config", "dtparam=i2c_arm=on", "--compress", "zst", "--bmap"]) == 0
    printed = capsys.readouterr().out
    assert "CLI-1" in printed and _sha256(out) in printed
    assert f"{out}.zst" in printed and f"{out}.bmap" in printed
    layout = read_layout(out)
    assert fat.read_file(out, layout.partition(1), "kernel_2712.img")
    assert b"dtparam=i2c_arm=on" in (fat.read_file(out, layout.partition(1), "config.txt") or b"")


@pytest.mark.parametrize("argv, message", [
    (["--size", "40MiB"], "image size 40.0 MiB cannot hold the partitions: the minimum .* is 80 MiB"),
    (["--boot-size", "16MiB"], "too small for FAT32; the minimum is 33 MiB"),
    (["--size", "lots"], "--size: 'lots' is not a size"),
    (["--compress", "xz,rar"], "unknown compression rar"),
    (["--broken", "oversize"], "oversize image needs the eMMC size"),
    (["--build-id", "has space"], "build id 'has space'"),
    (["--cmdline", "a b"], "kernel argument is empty or contains white space"),
])
def test_cli_bad_input_exits_2_with_one_line(argv: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad.img"
    assert main(["image", "build", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # mkfs.fat is still found in /usr/sbin, mtools is not
    with pytest.raises(InfrastructureError, match="mcopy not found"):
        build_image(tmp_path / "x.img", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown model 'cm9'"):
        build_image(tmp_path / "x.img", ImageSpec(model="cm9"))
