"""Flashing the virtual CM4: discovery by port, every guard refusal, every source format, bad images
refused before a byte lands, verification, eMMC faults, the partition check, boot options, the cache
and ``hil flash`` itself."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from hil.cli import main as hil_main
from hil.control.relays import RelayBank
from hil.disk.discovery import Disk, disks_on_port, wait_for_disk
from hil.disk.guard import GuardedDisk, GuardRefusal, check_still_same, guard_disk
from hil.errors import InputError, ProductError
from hil.flash.cache import ImageCache
from hil.flash.postcheck import (
    check_partitions,
    lint_image,
    lint_layout,
    set_boot_options,
    set_cmdline,
    set_config,
)
from hil.flash.ranges import total
from hil.flash.sources import open_image
from hil.flash.verify import verify_written
from hil.flash.writer import WriteResult, write_image
from hil.image import compress as packing
from hil.image import ext4, fat
from hil.image.build import BuiltImage, ImageSpec, build_image
from hil.image.mbr import DiskLayout, Partition
from hil.image.tools import tool_env
from hil.models import MODELS
from hil.rig import Rig, load_rig
from tests.rigfiles import virtual_rig_toml

if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", "") or os.geteuid() != 0:
    pytest.skip("needs root and umockdev: run pytest under umockdev-wrapper as root", allow_module_level=True)

from hil.usbboot.host import UsbBoot  # noqa: E402
from hil.virtual.rig import VirtualRig  # noqa: E402
from hil.virtual.usb.payloads import make_payload  # noqa: E402

MiB = 1024**2
EMMC = 256 * MiB
FORMATS = ("xz", "gz", "zst", "bz2")


@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_payload(tmp_path_factory.mktemp("payload"), "mass-storage-gadget64", ("cm4",), boot_img_size=MiB)


@pytest.fixture(scope="session")
def make_rig(tmp_path_factory: pytest.TempPathFactory, payload: Path) -> Callable[..., Rig]:
    def make(name: str, port: str, gpios: tuple[int, int], usb: Mapping[str, object] | None = None) -> Rig:
        """Rigs alive at once need their own GPIOs: the mock pin factory is shared by the process."""
        folder = tmp_path_factory.mktemp(name)
        path = folder / "rig.toml"
        path.write_text(virtual_rig_toml(name, "cm4", port, state_dir=folder / "state", emmc=f"{EMMC // MiB}MiB",
                                         power_gpio=gpios[0], boot_gpio=gpios[1], nwp_gpio=None, off_time=0.01,
                                         baud=115200, timeouts={"mass_storage": 5}, speedup=50.0,
                                         extra={"relays": {"pin_factory": "mock"}, "usb": {"payload": str(payload)},
                                                "virtual": {"usb": dict(usb or {})}}))
        return load_rig(path)

    return make


@dataclass
class Booted:
    rig: Rig
    virtual: VirtualRig
    relays: RelayBank

    def emmc_sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.virtual.emmc.image_path, "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        return h.hexdigest()


def boot(rig: Rig) -> Iterator[Booted]:
    with VirtualRig(rig) as virtual, RelayBank(rig.relays) as relays:
        assert relays.nrpi_boot is not None and relays.power is not None
        relays.nrpi_boot.set(True)
        relays.power.set(True)
        UsbBoot.for_rig(rig, settle=0.01).run()
        yield Booted(rig, virtual, relays)


@pytest.fixture(scope="module")
def booted(make_rig: Callable[..., Rig]) -> Iterator[Booted]:
    """The module in mass-storage mode on port 5-1.3, for the whole module's tests."""
    yield from boot(make_rig("flash-main", "5-1.3", (17, 27)))


@dataclass(frozen=True)
class Images:
    good: BuiltImage  # raw, every compressed copy and a .bmap
    plain: dict[str, Path]  # the same files in a folder without the .bmap, and a "dense" raw copy
    truncated: dict[str, Path]  # compressed copies cut in half
    corrupt: dict[str, Path]  # compressed copies with 16 bytes inverted in the middle
    truncated_raw: Path
    corrupt_raw: Path  # garbage partition entries
    oversize: list[Path]  # raw and .xz, larger than the eMMC
    cm3: BuiltImage


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    spec = ImageSpec(size=64 * MiB, boot_size=36 * MiB, fill=3 * MiB)

    def build(name: str, **changes: Any) -> BuiltImage:
        return build_image(tmp_path_factory.mktemp(name) / f"{name}.img", replace(spec, **changes))

    def copies(name: str, change: Callable[[Path], None] = lambda p: None) -> dict[str, Path]:
        folder = tmp_path_factory.mktemp(name)
        out = {"raw": folder / good.path.name, "dense": folder / "dense.img"}
        subprocess.run(["cp", "--sparse=always", str(good.path), str(out["raw"])], check=True, env=tool_env())
        shutil.copyfile(good.path, out["dense"])  # every hole written out as zeros
        for fmt, path in good.compressed.items():
            out[fmt] = folder / path.name
            shutil.copyfile(path, out[fmt])
            change(out[fmt])
        return out

    good = build("good", compress=FORMATS, bmap=True)
    oversize = build("oversize", fill=0, broken="oversize", emmc_size=EMMC)
    subprocess.run(["xz", "-0", "-T0", "-k", str(oversize.path)], check=True, env=tool_env())
    return Images(good=good, plain=copies("plain"), truncated=copies("truncated", packing.truncate_stream),
                  corrupt=copies("corrupt", packing.corrupt_stream),
                  truncated_raw=build("truncraw", broken="truncated").path,
                  corrupt_raw=build("corruptraw", broken="corrupt").path,
                  oversize=[oversize.path, Path(f"{oversize.path}.xz")], cm3=build("cm3", model="cm3", fill=0))


pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def guarded(booted: Booted) -> Iterator[GuardedDisk]:
    disk = wait_for_disk(booted.rig.usb_port, 5)
    with guard_disk(disk, booted.rig) as g:
        yield g


def flash(g: GuardedDisk, path: Path, **options: object) -> WriteResult:
    image = open_image(path, g.disk.size, **options)  # type: ignore[arg-type]
    result = write_image(image, g.fd, g.disk.node, g.disk.size)
    verify_written(g.fd, g.disk.node, result.written)
    return result


def landed(booted: Booted, built: BuiltImage) -> None:
    """The eMMC, as the module itself reads it, holds the image's build and a sound partition table."""
    root = built.layout.partition(2)
    assert ext4.read_file(booted.virtual.emmc.image_path, root, "/etc/build-id") == f"{built.build_id}\n".encode()
    assert fat.read_file(booted.virtual.emmc.image_path, built.layout.partition(1), "config.txt")


# -- discovery ------------------------------------------------------------------------------------------


def test_discovery_names_the_disk_on_the_rig_port(booted: Booted) -> None:
    disk = wait_for_disk(booted.rig.usb_port, 5)
    assert disk.port == booted.rig.usb_port and disk.size == EMMC and disk.bus == "usb"
    assert disk.node.startswith("/dev/sd") and disk.vendor == "mmcblk0"
    assert disk.id_path and "usb-0:1.3" in disk.id_path
    assert disks_on_port("5-1.4") == []


def test_late_and_duplicate_disks(make_rig: Callable[..., Rig]) -> None:
    """The disk gets its medium late and a twin appears on 6-1.5: the rig's disk is found, once it has a size,
    and the twin is refused by the port check."""
    rig = make_rig("flash-faults", "6-1.2", (5, 6), usb={"late_disk": 0.4, "duplicate_disk": "6-1.5"})
    for b in boot(rig):
        disk = wait_for_disk(rig.usb_port, 5)
        assert disk.port == "6-1.2" and disk.size == EMMC
        twin, = disks_on_port("6-1.5")
        with pytest.raises(GuardRefusal, match="check 'usb port'") as e:
            guard_disk(twin, rig)
        assert e.value.check == "usb port" and twin.node in str(e.value)
        with guard_disk(disk, rig) as g:
            b.relays.power.set(False)  # type: ignore[union-attr]  # unplugged between guard and write
            deadline = time.monotonic() + 5
            while disks_on_port(rig.usb_port) and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(GuardRefusal, match="same device"):
                check_still_same(g, rig)


def test_no_disk_on_the_port_times_out_naming_the_port() -> None:
    with pytest.raises(Exception, match="no disk appeared on USB port 9-1.1"):
        wait_for_disk("9-1.1", 0.2)


# -- guard ----------------------------------------------------------------------------------------------


def test_guard_refuses_another_transport_and_a_wrong_size(booted: Booted) -> None:
    disk = wait_for_disk(booted.rig.usb_port, 5)
    with pytest.raises(GuardRefusal, match="check 'usb transport'"):
        guard_disk(dataclasses.replace(disk, bus="ata"), booted.rig)
    with pytest.raises(GuardRefusal, match="check 'size'"):
        guard_disk(disk, dataclasses.replace(booted.rig, emmc_size=2 * EMMC))


def test_guard_refuses_the_hosts_root_disk(booted: Booted) -> None:
    source = subprocess.run(["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True, env=tool_env())
    node = source.stdout.strip()
    if not node.startswith("/dev/"):
        pytest.skip(f"/ is not on a block device here ({node})")
    size = int(subprocess.run(["lsblk", "-bdno", "SIZE", node], capture_output=True, text=True,
                              env=tool_env()).stdout or 0)
    host = Disk(node, "/sys/fake", booted.rig.usb_port, size, "Host", "Disk", "usb", None, None, "0a5c:0104")
    with pytest.raises(GuardRefusal, match="check 'system disk'.*holds / of this host"):
        guard_disk(host, dataclasses.replace(booted.rig, emmc_size=size))


def test_guard_refuses_a_mounted_disk_and_one_held_exclusively(booted: Booted, tmp_path: Path) -> None:
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
    env = tool_env()
    subprocess.run(["mkfs.ext4", "-q", str(backing)], check=True, env=env)
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()
    (tmp_path / "mnt").mkdir()
    try:
        subprocess.run(["mount", loop, str(tmp_path / "mnt")], check=True, env=env)
        try:
            mounted = Disk(loop, "/sys/fake", booted.rig.usb_port, 16 * MiB, "Loop", "", "usb", None, None,
                           "0a5c:0104")
            with pytest.raises(GuardRefusal, match=f"check 'mounted'.*{tmp_path / 'mnt'}"):
                guard_disk(mounted, dataclasses.replace(booted.rig, emmc_size=16 * MiB))
        finally:
            subprocess.run(["umount", str(tmp_path / "mnt")], check=True, env=env)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True, env=env)
    disk = wait_for_disk(booted.rig.usb_port, 5)
    holder = os.open(booted.virtual.emmc.block_device, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(GuardRefusal, match="check 'exclusive open'.*busy"):
            guard_disk(disk, booted.rig)
    finally:
        os.close(holder)


# -- formats and plans ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", *FORMATS])
def test_each_format_with_its_bmap(guarded: GuardedDisk, booted: Booted, images: Images, fmt: str) -> None:
    path = images.good.path if fmt == "raw" else images.good.compressed[fmt]
    result = flash(guarded, path)
    assert result.plan == "bmap" and result.image_size == images.good.size
    assert result.bytes_written == total(open_image(path, EMMC).bmap.ranges)  # type: ignore[union-attr]
    landed(booted, images.good)


@pytest.mark.parametrize("fmt", ["raw", "dense", "xz", "zst"])
def test_without_a_bmap_the_holes_or_filesystems_decide(guarded: GuardedDisk, booted: Booted, images: Images,
                                               fmt: str) -> None:
    result = flash(guarded, images.plain[fmt])
    assert result.plan == ("sparse" if fmt == "raw" else "filesystems")
    assert result.bytes_written < images.good.size // 2
    landed(booted, images.good)
    assert check_partitions(guarded.fd, guarded.disk.node).boot_fat == "FAT32"


# -- bad images: refused before a byte is written ------------------------------------------------------


def bad_images(images: Images) -> list[tuple[str, Path]]:
    return ([(f"truncated {f}", images.truncated[f]) for f in FORMATS]
            + [(f"corrupt {f}", images.corrupt[f]) for f in FORMATS]
            + [("truncated raw", images.truncated_raw), ("corrupt raw", images.corrupt_raw)])


def test_bad_images_are_refused_and_the_disk_untouched(guarded: GuardedDisk, booted: Booted,
                                                       images: Images) -> None:
    before = booted.emmc_sha256()
    for what, path in bad_images(images):
        with pytest.raises(InputError, match="corrupt or truncated.*nothing was written"):
            open_image(path, EMMC)
        assert what
    for path in images.oversize:
        with pytest.raises(InputError, match="larger than the 256.0 MiB eMMC"):
            open_image(path, EMMC)
    assert booted.emmc_sha256() == before


@pytest.mark.parametrize("fmt", ["xz", "bz2"])
def test_a_late_decode_error_marks_the_disk_unbootable(guarded: GuardedDisk, booted: Booted, images: Images,
                                                       fmt: str) -> None:
    flash(guarded, images.good.path)
    image = open_image(images.corrupt[fmt], EMMC, test_limit=0)  # too big to test up front
    with pytest.raises(ProductError, match="image corrupt.*marked unbootable") as e:
        write_image(image, guarded.fd, guarded.disk.node, EMMC)
    assert e.value.evidence["unbootable"]
    assert booted.virtual.emmc.read(0, MiB) == bytes(MiB)


# -- verification and faults ---------------------------------------------------------------------------


def test_verification_catches_a_byte_flipped_behind_the_writers_back(guarded: GuardedDisk, booted: Booted,
                                                                     images: Images) -> None:
    image = open_image(images.good.compressed["zst"], EMMC)
    result = write_image(image, guarded.fd, guarded.disk.node, EMMC)
    victim = result.written[len(result.written) // 2]
    at = victim.start + 1000
    with open(booted.virtual.emmc.image_path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ProductError, match=f"verification failed.*bytes {victim.start}-{victim.end} differ"):
        verify_written(guarded.fd, guarded.disk.node, result.written)


def test_an_emmc_write_error_is_a_product_fault(guarded: GuardedDisk, booted: Booted, images: Images) -> None:
    """The write fails, or (when the eMMC swallows the error) the read-back catches the stale bytes."""
    start, end = max(open_image(images.good.path, EMMC).bmap.ranges,  # type: ignore[union-attr]
                     key=lambda r: r[1] - r[0])
    at = (start + end) // 2 // 4096 * 4096  # inside the largest range the image maps (the fill data)
    with open(booted.virtual.emmc.image_path, "r+b") as f:  # what an earlier flash left there must differ
        f.seek(at)
        f.write(bytes(4096))
    booted.virtual.emmc.inject_error(at, 4096, "write")
    try:
        with pytest.raises(ProductError, match="failed a write at byte|verification failed") as e:
            flash(guarded, images.good.compressed["xz"])
    finally:
        booted.virtual.emmc.clear_errors()
    assert e.value.evidence.get("unbootable") or e.value.evidence["offset"] <= at < e.value.evidence["end"]


# -- after the write -----------------------------------------------------------------------------------


def test_partition_check_and_boot_options(guarded: GuardedDisk, booted: Booted, images: Images) -> None:
    flash(guarded, images.good.path)
    parts = check_partitions(guarded.fd, guarded.disk.node)
    assert (parts.boot.start, parts.boot_fat, parts.root.index) == (4 * MiB, "FAT32", 2)
    set_boot_options(guarded.fd, guarded.disk.node, parts.boot, {"enable_uart": "0", "dtoverlay": "dwc2"},
                     ["quiet", "console=serial0,9600"])
    emmc, boot_part = booted.virtual.emmc.image_path, images.good.layout.partition(1)
    config = fat.read_file(emmc, boot_part, "config.txt").decode()  # type: ignore[union-attr]
    assert "enable_uart=0" in config.splitlines() and "enable_uart=1" not in config
    assert config.rstrip().endswith("dtoverlay=dwc2") and "dtoverlay=vc4-kms-v3d" in config
    cmdline = fat.read_file(emmc, boot_part, "cmdline.txt").decode()  # type: ignore[union-attr]
    assert cmdline.count("\n") == 1 and " quiet" in cmdline and "console=serial0,9600" in cmdline.split()
    assert [w for w in cmdline.split() if w.startswith("console=")] == ["console=serial0,9600"]
    with open(booted.virtual.emmc.image_path, "r+b") as f:  # the root file system goes missing
        f.seek(parts.root.start + 1024)
        f.write(bytes(1024))
    with pytest.raises(ProductError, match="holds no ext4 file system"):
        check_partitions(guarded.fd, guarded.disk.node)


def test_config_and_cmdline_editing() -> None:
    assert set_config("a=1\n[cm4]\notg_mode=1\n", {"a": "2", "enable_uart": "1"}) == \
        "a=2\n[cm4]\notg_mode=1\n[all]\nenable_uart=1\n"
    assert set_config("[all]\n#enable_uart=0\n", {"enable_uart": "1"}) == "[all]\n#enable_uart=0\nenable_uart=1\n"
    assert set_cmdline("console=tty1 root=X rootwait\n", ["root=Y", "quiet", "rootwait"]) == \
        "console=tty1 root=Y rootwait quiet\n"


def test_cm3_lint(images: Images) -> None:
    cm3 = MODELS["cm3"]
    assert lint_image(open_image(images.cm3.path, EMMC), cm3) == []
    assert lint_image(open_image(images.good.compressed["xz"], EMMC), MODELS["cm4"]) == []
    late = DiskLayout(1, (Partition(1, 8 * MiB, 64 * MiB, 0x0C), Partition(2, 72 * MiB, 64 * MiB, 0x83)))
    warnings = lint_layout(late, "FAT16", cm3)
    assert any("not at 4 MiB" in w for w in warnings) and any("formatted FAT16" in w for w in warnings)


# -- cache ---------------------------------------------------------------------------------------------


def test_a_second_flash_comes_from_the_cache(guarded: GuardedDisk, booted: Booted, images: Images,
                                             tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", max_bytes=64 * MiB)
    image = open_image(images.plain["bz2"], EMMC)
    first = write_image(image, guarded.fd, guarded.disk.node, EMMC, cache=cache)
    second = write_image(image, guarded.fd, guarded.disk.node, EMMC, cache=cache)
    assert (first.from_cache, second.from_cache, second.plan) == (False, True, "cache")
    assert [w.digest for w in second.written] == [w.digest for w in first.written]
    verify_written(guarded.fd, guarded.disk.node, second.written)
    landed(booted, images.good)
    small = ImageCache(tmp_path / "cache", max_bytes=MiB)
    small.trim()
    assert small.lookup(cache.key(image.path)) is None


# -- the command ---------------------------------------------------------------------------------------


def test_hil_flash_dry_run_then_flash(make_rig: Callable[..., Rig], images: Images, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The command drives the relays and the USB boot itself; the dry run leaves the eMMC alone."""
    monkeypatch.setenv("HIL_CACHE_DIR", str(tmp_path / "cache"))
    rig = make_rig("flash-cli", "7-1.6", (13, 19))
    with VirtualRig(rig) as virtual:
        image = images.good.compressed["gz"]
        before = virtual.emmc.read(0, EMMC)
        assert hil_main(["flash", str(image), "--rig", str(rig.path), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "dry run: would write" in out and "USB port 7-1.6" in out
        assert virtual.emmc.read(0, EMMC) == before
        assert hil_main(["flash", str(image), "--rig", str(rig.path), "--config", "enable_uart=1"]) == 0
        out = capsys.readouterr().out
        assert "identical (XXH3-128 of each written range)" in out  # the comparison verification used
        assert "verify" in out and "check   p1 FAT32 boot at 4 MiB" in out
        assert virtual.emmc.read(0, 512) == images.good.path.read_bytes()[:512]
        assert list((tmp_path / "cache").glob("*.img"))  # the decoded image, for the next flash
        assert hil_main(["flash", str(images.oversize[0]), "--rig", str(rig.path)]) == 2
