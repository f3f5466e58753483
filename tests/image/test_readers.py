"""The partition table, FAT and ext4 readers on built images, hand-made tables and garbage."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from hil.errors import InputError, ProductError
from hil.image import ext4, fat
from hil.image.build import BuiltImage, ImageSpec, MiB, build_image
from hil.image.mbr import DiskLayout, Partition, encode, partuuid, read_layout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    out = tmp_path_factory.mktemp("readers") / "cm4.img"
    spec = ImageSpec(size=56 * MiB, boot_size=33 * MiB, build_id="READ-1", disk_id=0x1A2B3C4D)
    return build_image(out, spec)


@pytest.fixture
def copy(built: BuiltImage, tmp_path: Path) -> Path:
    """A private copy of the built image, for tests that write to it."""
    out = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", built.path, out], check=True)
    return out


def _sector(entries: list[tuple[int, int, int, int]], signature: bytes = b"\x55\xaa") -> bytes:
    """An MBR with (status, type, first LBA, sectors) entries."""
    mbr = bytearray(512)
    for i, (status, type_id, lba, count) in enumerate(entries):
        at = 446 + 16 * i
        mbr[at], mbr[at + 4] = status, type_id
        mbr[at + 8:at + 16] = lba.to_bytes(4, "little") + count.to_bytes(4, "little")
    mbr[510:512] = signature
    return bytes(mbr)


# --- MBR ---------------------------------------------------------------------------------------------

def test_layout_round_trips_through_encode(tmp_path: Path) -> None:
    layout = DiskLayout(0xDEADBEEF, (Partition(1, 4096, 8192, 0x0C, bootable=True),
                                     Partition(2, 3 * MiB, 20 * 1024**3, 0x83)))  # CHS saturates past 8 GiB
    disk = tmp_path / "disk.img"
    disk.write_bytes(encode(layout))
    os.truncate(disk, layout.partitions[-1].end)
    with open(disk, "rb") as f:
        assert read_layout(f) == layout


def test_partuuid_is_written_as_raspberry_pi_os_does() -> None:
    assert partuuid(0x1A2B3C4D, 2) == "1a2b3c4d-02"
    assert partuuid(0xAB, 1) == "000000ab-01"


def test_built_image_has_its_partitions_where_raspberry_pi_os_has_them(built: BuiltImage) -> None:
    layout = read_layout(built.path)
    assert layout == built.layout
    boot, root = layout.partitions
    assert (boot.start, boot.size, boot.type_id) == (8192 * 512, 33 * MiB, 0x0C)
    assert (root.start % (4 * MiB), root.type_id, root.end) == (0, 0x83, 56 * MiB)
    assert layout.disk_id == 0x1A2B3C4D
    with pytest.raises(ProductError, match="no partition 3"):
        layout.partition(3)


@pytest.mark.parametrize("sector, why", ids=["random", "unsigned", "status", "overlap", "sector-0", "short"],
                         argvalues=[
    (os.urandom(510) + b"\x00\x00", "0x55AA"),
    (_sector([(0x00, 0x0C, 8192, 1000)], signature=b"\x00\x00"), "0x55AA"),
    (_sector([(0x42, 0x0C, 8192, 1000)]), "invalid status byte 0x42"),
    (_sector([(0x00, 0x0C, 8192, 1000), (0x00, 0x83, 9000, 1000)]), "partitions 1 and 2 overlap"),
    (_sector([(0x00, 0x83, 0, 100)]), "starts at sector 0"),
    (b"\x55\xaa" * 10, "only 20 bytes"),
])
def test_garbage_is_no_partition_table(sector: bytes, why: str) -> None:
    disk = io.BytesIO(sector + (bytes(8 * MiB) if len(sector) == 512 else b""))
    with pytest.raises(ProductError, match=f"no partition table on .*{why}") as e:
        read_layout(disk)
    assert e.value.stage == "image.mbr"


def test_partition_past_the_end_of_the_disk_is_reported(tmp_path: Path) -> None:
    img = tmp_path / "short.img"
    img.write_bytes(_sector([(0x00, 0x0C, 8192, 2048)]) + bytes(4 * MiB))
    with pytest.raises(ProductError, match=r"partition 1 of .*short.img ends at byte 5242880, beyond the e"):
        read_layout(img)


# --- FAT ---------------------------------------------------------------------------------------------

def test_fat_reads_files_and_tells_absent_ones(built: BuiltImage) -> None:
    boot = built.layout.partition(1)
    assert fat.fat_type(built.path, boot) == "FAT32"
    assert b"enable_uart=1" in (fat.read_file(built.path, boot, "config.txt") or b"")
    assert fat.read_file(built.path, boot, "/CMDLINE.TXT") == fat.read_file(built.path, boot, "cmdline.txt")
    assert fat.read_file(built.path, boot, "missing.txt") is None


def test_fat_write_replaces_and_creates_files_in_folders(copy: Path, built: BuiltImage) -> None:
    boot = built.layout.partition(1)
    fat.write_file(copy, boot, "config.txt", b"arm_64bit=1\n")
    fat.write_file(copy, boot, "overlays/hil/test.dtbo", bytes(range(256)) * 40)
    fat.write_file(copy, boot, "overlays/second.dtbo", b"\x00")
    assert fat.read_file(copy, boot, "config.txt") == b"arm_64bit=1\n"
    assert fat.read_file(copy, boot, "overlays/hil/test.dtbo") == bytes(range(256)) * 40
    assert fat.read_file(copy, boot, "overlays/second.dtbo") == b"\x00"
    assert fat.read_file(built.path, boot, "overlays/second.dtbo") is None  # the original is untouched


def test_fat_type_tells_fat16_and_non_fat(tmp_path: Path, built: BuiltImage) -> None:
    img = tmp_path / "fat16.img"
    subprocess.run(["mkfs.fat", "-C", "-F", "16", img, str(20 * 1024)], check=True, capture_output=True)
    assert fat.fat_type(img, Partition(1, 0, 20 * MiB, 0x0E)) == "FAT16"
    assert fat.fat_type(built.path, built.layout.partition(2)) is None


def test_fat_on_garbage_is_a_product_error(tmp_path: Path) -> None:
    img = tmp_path / "garbage.img"
    img.write_bytes(os.urandom(MiB))
    with pytest.raises(ProductError, match="FAT partition 1 of .*no valid FAT boot sector") as e:
        fat.read_file(img, Partition(1, 0, MiB, 0x0C), "config.txt")
    assert e.value.stage == "image.fat"


# --- ext4 --------------------------------------------------------------------------------------------

def test_ext4_reads_files_through_symlinks(built: BuiltImage) -> None:
    root = built.layout.partition(2)
    assert ext4.is_ext4(built.path, root)
    assert ext4.read_file(built.path, root, "/etc/build-id") == b"READ-1\n"
    assert b"VERSION_CODENAME=bookworm" in (ext4.read_file(built.path, root, "/etc/os-release") or b"")
    assert ext4.read_file(built.path, root, "/etc/missing") is None
    assert ext4.read_file(built.path, root, "/missing/dir/file") is None


def test_ext4_refuses_what_is_not_a_file(built: BuiltImage) -> None:
    root = built.layout.partition(2)
    with pytest.raises(InputError, match="is a directory"):
        ext4.read_file(built.path, root, "/etc")
    with pytest.raises(InputError, match="not a plain absolute path"):
        ext4.read_file(built.path, root, "etc/hostname")
    assert not ext4.is_ext4(built.path, built.layout.partition(1))


def test_ext4_on_garbage_or_cut_short_is_a_product_error(tmp_path: Path) -> None:
    img = tmp_path / "garbage.img"
    img.write_bytes(os.urandom(MiB))
    with pytest.raises(ProductError, match="no ext4 superblock") as e:
        ext4.read_file(img, Partition(2, 0, MiB, 0x83), "/etc/hostname")
    assert e.value.stage == "image.ext4"
    cut = build_image(tmp_path / "cut.img", ImageSpec(size=72 * MiB, boot_size=33 * MiB, fill=16 * MiB,
                                                      broken="truncated"))
    with pytest.raises(ProductError, match="ext4 partition 2 .*short read"):
        ext4.read_file(cut.path, cut.layout.partition(2), "/var/lib/hil/fill.bin")


def test_tools_ignore_the_umockdev_preload(built: BuiltImage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under umockdev-wrapper LD_PRELOAD is set; a tool that inherited it would warn or misbehave."""
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libumockdev-preload.so.0")
    assert ext4.read_file(built.path, built.layout.partition(2), "/etc/build-id") == b"READ-1\n"
    assert fat.read_file(built.path, built.layout.partition(1), "cmdline.txt") is not None
