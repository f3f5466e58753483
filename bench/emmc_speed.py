"""How fast the virtual eMMC looks to a writer, against the rate its model is configured for.

Run as root: ``.venv/bin/python bench/emmc_speed.py [--size-mib 128] [--rates 35,0]``. Prints one row per
configured rate and access method: Python O_DIRECT (1 MiB and 4 MiB requests) and dd with
oflag/iflag=direct, through the loop device over the throttling FUSE file. A last row loops the image
directly (no FUSE), the cost baseline for an unthrottled eMMC.
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hil.rig import VirtualEmmc as EmmcConfig
from hil.virtual.emmc import VirtualEmmc

MiB = 1024 * 1024
ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR")}


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def python_direct(device: str, size: int, chunk: int, write: bool) -> float:
    buf = mmap.mmap(-1, chunk)
    buf.write(b"\xa5" * chunk)
    fd = os.open(device, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        io = os.pwritev if write else os.preadv
        return timed(lambda: [io(fd, [buf], offset) for offset in range(0, size, chunk)])
    finally:
        os.close(fd)


def dd_direct(device: str, size: int, write: bool) -> float:
    count = str(size // (4 * MiB))
    if write:
        cmd = ["dd", "if=/dev/zero", f"of={device}", "bs=4M", f"count={count}", "oflag=direct", "status=none"]
    else:
        cmd = ["dd", f"if={device}", "of=/dev/null", "bs=4M", f"count={count}", "iflag=direct", "status=none"]
    return timed(lambda: subprocess.run(cmd, env=ENV, check=True))


METHODS: dict[str, Callable[[str, int, bool], float]] = {
    "python O_DIRECT 1 MiB": lambda d, s, w: python_direct(d, s, MiB, w),
    "python O_DIRECT 4 MiB": lambda d, s, w: python_direct(d, s, 4 * MiB, w),
    "dd bs=4M direct": dd_direct,
}


def measure(device: str, size: int) -> list[tuple[str, float, float]]:
    """(method, write MB/s, read MB/s) for each method."""
    rows = []
    for name, method in METHODS.items():
        write_s = method(device, size, True)
        read_s = method(device, size, False)
        rows.append((name, size / write_s / 1e6, size / read_s / 1e6))
    return rows


def plain_loop(image: Path, size: int) -> list[tuple[str, float, float]]:
    device = subprocess.run(["losetup", "--find", "--show", str(image)], env=ENV, check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        return measure(device, size)
    finally:
        subprocess.run(["losetup", "--detach", device], env=ENV, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--rates", default="35,0", help="configured MB/s, comma separated; 0 = unlimited")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the eMMC is a loop device over a FUSE file only for root")
    size = args.size_mib * MiB
    print(f"{'model MB/s':>10}  {'method':<24} {'write MB/s':>10} {'read MB/s':>10}"
          f"  ({args.size_mib} MiB each)")
    with tempfile.TemporaryDirectory(prefix="emmc-bench-") as tmp:
        image = Path(tmp) / "emmc.img"
        for rate in (float(r) for r in args.rates.split(",")):
            with VirtualEmmc(image, size, EmmcConfig(rate * 1e6, rate * 1e6, (), True)) as emmc:
                for name, write, read in measure(emmc.block_device, size):
                    label = f"{rate:g}" if rate else "unlimited"
                    print(f"{label:>10}  {name:<24} {write:>10.1f} {read:>10.1f}")
        for name, write, read in plain_loop(image, size):
            print(f"{'no FUSE':>10}  {name:<24} {write:>10.1f} {read:>10.1f}")
        setup = timed(lambda: VirtualEmmc(image, size, EmmcConfig(0, 0, (), True)).open().close())
        print(f"open + close of the FUSE-backed loop device: {setup * 1000:.0f} ms")


if __name__ == "__main__":
    main()
