"""The virtual eMMC as a writer sees it: a block device that keeps data, fails where told, and is slow."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.errors import InfrastructureError
from hil.hostenv import outside_umockdev
from hil.rig import EmmcFault
from hil.rig import VirtualEmmc as EmmcConfig
from hil.virtual.emmc import VirtualEmmc
from hil.virtual.journal import Journal

MiB = 1024 * 1024
SIZE = 64 * MiB
CLEAN_ENV = outside_umockdev()

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="loop devices over FUSE need root and /dev/fuse")


def config(write_bps: float = 0, read_bps: float = 0, faults: tuple[EmmcFault, ...] = (),
           loop: bool = True) -> EmmcConfig:
    return EmmcConfig(write_bps, read_bps, faults, loop)


def leftovers(under: Path) -> list[str]:
    """Loop devices and mounts that still refer to anything below ``under``."""
    out = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], env=CLEAN_ENV,
                         capture_output=True, text=True, check=False).stdout
    loops = json.loads(out)["loopdevices"] if out.strip() else []
    found = [d["name"] for d in loops if str(under) in (d.get("back-file") or "")]
    with open("/proc/self/mounts") as f:
        found += [line.split()[1] for line in f if str(under) in line.split()[1]]
    return found


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private runtime directory; whatever a failed test leaves in it is removed afterwards."""
    run = tmp_path / "run"
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(run))
    yield run
    for thing in leftovers(run):
        if thing.startswith("/dev/"):
            subprocess.run(["losetup", "-d", thing], env=CLEAN_ENV, check=False)
    for thing in leftovers(run):
        subprocess.run(["fusermount", "-u", "-z", thing], env=CLEAN_ENV, check=False)


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def pwrite_direct(device: str, data: bytes, offset: int) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwritev(fd, [aligned(data)], offset)
    finally:
        os.close(fd)


def pread_direct(device: str, length: int, offset: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)


def test_without_a_loop_device_the_image_is_the_disk(tmp_path: Path, runtime: Path) -> None:
    image = tmp_path / "state" / "deep" / "emmc.img"
    journal = Journal()
    with VirtualEmmc(image, SIZE, config(loop=False), journal) as emmc:
        assert emmc.block_device == str(image)
        assert not emmc.modelled
        assert image.stat().st_size == SIZE
        assert image.stat().st_blocks * 512 < MiB  # sparse
        emmc.inject_error(0, 4096, "both")
        assert emmc.read(0, 4) == b"\0" * 4  # the module's own view never fails
        with pytest.raises(ValueError):
            emmc.inject_error(0, 4096, "erase")
    assert [e.what for e in journal.events("emmc")] == ["attached", "fault injected", "detached"]


@needs_root
def test_direct_writes_land_in_the_image_and_persist(tmp_path: Path, runtime: Path) -> None:
    image = tmp_path / "emmc.img"
    journal = Journal()
    with VirtualEmmc(image, SIZE, config(), journal) as emmc:
        assert emmc.modelled and emmc.block_device.startswith("/dev/loop")
        pwrite_direct(emmc.block_device, b"cm-hil" * (MiB // 6) + b"\0" * (MiB % 6), 5 * MiB)
        assert emmc.read(5 * MiB, 6) == b"cm-hil"
        assert pread_direct(emmc.block_device, 4096, 5 * MiB)[:6] == b"cm-hil"
    assert image.stat().st_size == SIZE
    with VirtualEmmc(image, SIZE, config()) as emmc:
        assert emmc.read(5 * MiB, 6) == b"cm-hil"
        assert pread_direct(emmc.block_device, 4096, 5 * MiB)[:6] == b"cm-hil"
    assert [e.what for e in journal.events("emmc")] == ["attached", "detached"]
    assert leftovers(runtime) == []


@needs_root
def test_configured_write_fault_fails_only_there(tmp_path: Path, runtime: Path) -> None:
    fault = EmmcFault(offset=10 * MiB, length=4096, op="write")
    with VirtualEmmc(tmp_path / "emmc.img", SIZE, config(faults=(fault,))) as emmc:
        with pytest.raises(OSError) as failed:
            pwrite_direct(emmc.block_device, b"x" * MiB, 10 * MiB)
        assert failed.value.errno == errno.EIO
        pwrite_direct(emmc.block_device, b"y" * MiB, 12 * MiB)
        assert emmc.read(12 * MiB, 1) == b"y"
        pread_direct(emmc.block_device, 4096, 10 * MiB)  # a write fault leaves reads alone


@needs_root
def test_faults_injected_and_cleared_at_run_time(tmp_path: Path, runtime: Path) -> None:
    with VirtualEmmc(tmp_path / "emmc.img", SIZE, config()) as emmc:
        pwrite_direct(emmc.block_device, b"z" * MiB, 20 * MiB)
        emmc.inject_error(20 * MiB + 512, 512, "read")
        with pytest.raises(OSError) as failed:
            pread_direct(emmc.block_device, MiB, 20 * MiB)
        assert failed.value.errno == errno.EIO
        assert pread_direct(emmc.block_device, MiB, 21 * MiB) == b"\0" * MiB
        pwrite_direct(emmc.block_device, b"w" * MiB, 20 * MiB)  # a read fault leaves writes alone
        emmc.inject_error(30 * MiB, MiB, "both")
        with pytest.raises(OSError):
            pwrite_direct(emmc.block_device, b"v" * MiB, 30 * MiB)
        emmc.clear_errors()
        assert pread_direct(emmc.block_device, MiB, 20 * MiB) == b"w" * MiB
        pwrite_direct(emmc.block_device, b"v" * MiB, 30 * MiB)
        assert emmc.read(30 * MiB, 1) == b"v"


@needs_root
def test_writer_sees_the_speed_model(tmp_path: Path, runtime: Path) -> None:
    with VirtualEmmc(tmp_path / "emmc.img", SIZE, config(write_bps=20e6, read_bps=0)) as emmc:
        data = b"s" * (8 * MiB)
        start = time.monotonic()
        pwrite_direct(emmc.block_device, data, 0)
        assert time.monotonic() - start >= 0.35  # 8 MiB at 20 MB/s is 0.42 s
        emmc.set_rates(0, 20e6)
        start = time.monotonic()
        assert pread_direct(emmc.block_device, 8 * MiB, 0) == data
        assert time.monotonic() - start >= 0.35


@needs_root
def test_a_second_run_on_the_same_image_is_refused(tmp_path: Path, runtime: Path) -> None:
    image = tmp_path / "emmc.img"
    with VirtualEmmc(image, SIZE, config()), pytest.raises(InfrastructureError, match="another"):
        VirtualEmmc(image, SIZE, config()).open()


@needs_root
def test_leftovers_of_a_crashed_run_are_removed(tmp_path: Path, runtime: Path) -> None:
    image = tmp_path / "emmc.img"
    crash = ("import os, sys; from pathlib import Path; from hil.rig import VirtualEmmc as C; "
             "from hil.virtual.emmc import VirtualEmmc; "
             f"VirtualEmmc(Path({str(image)!r}), {SIZE}, C(0, 0, (), True)).open(); os._exit(1)")
    subprocess.run([sys.executable, "-c", crash], check=False, timeout=30)
    assert len(leftovers(runtime)) == 2  # the loop device and the mount outlived their run
    with VirtualEmmc(image, SIZE, config()) as emmc:
        pwrite_direct(emmc.block_device, b"a" * MiB, 0)
    assert leftovers(runtime) == []


@needs_root
def test_failed_setup_is_an_infrastructure_error_and_leaves_nothing(
        tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "losetup"
    fake.write_text("#!/bin/sh\necho 'losetup: cannot find an unused loop device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(InfrastructureError, match="unused loop device") as failed:
        VirtualEmmc(tmp_path / "emmc.img", SIZE, config()).open()
    assert failed.value.stage == "virtual.emmc"
    assert leftovers(runtime) == []
