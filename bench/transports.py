"""The two USB transports side by side: what the kernel transport's QEMU guest costs to start, and one USB boot
into mass storage with the disk found (``hil flash --dry-run``: ROM, second stage, usb-storage disk, guard) on
each, per model.

Run: ``.venv/bin/python bench/transports.py [--models cm1,cm4] [--runs 2]``. Rigs are made in a temporary folder
from ``tests/rigfiles.py``'s shape: root port 1-1, no eMMC speed limit, the umockdev rig differing only in
``[virtual] transport``. Prints medians of ``--runs`` wall times and the kernel/umockdev ratio with and without
the guest's start-up; the machine's load average is printed, as the guest's TCG time depends on a free core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hil.hostenv import outside_umockdev  # noqa: E402
from tests.rigfiles import virtual_rig_toml  # noqa: E402


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=outside_umockdev(), check=False, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cm1,cm3,cm4,cm5")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    hil = [sys.executable, "-m", "hil.cli"]
    with tempfile.TemporaryDirectory(prefix="hil-bench-transports-") as tmp:
        folder = Path(tmp)
        startup = statistics.median(timed([sys.executable, "-c", "from hil.virtual.guest.vm import run_python; "
                                           "raise SystemExit(run_python(['-c', 'pass']))"]) for _ in range(args.runs))
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.runs} runs each, medians\n")
        print(f"{'kernel transport guest: boot, run python -c pass, power off':<62} {startup:7.1f} s\n")
        print(f"{'USB boot to mass storage + disk found (flash --dry-run)':<40} {'umockdev':>9} {'kernel':>9} "
              f"{'ratio':>7} {'kernel - guest':>15} {'ratio':>7}")
        image = folder / "test.img"
        for model in args.models.split(","):
            subprocess.run([*hil, "image", "build", str(image), "--model", model, "--size", "96MiB"], check=True,
                           capture_output=True, cwd=ROOT)
            times = {}
            for transport in ("umockdev", "kernel"):
                rig = folder / f"{transport}-{model}.toml"
                rig.write_text(virtual_rig_toml(f"bench-{transport}-{model}", model, "1-1", emmc="256MiB",
                                                state_dir=folder / "state" / transport / model,
                                                extra={"virtual": {"transport": transport}}))
                times[transport] = statistics.median(
                    timed([*hil, "flash", str(image), "--rig", str(rig), "--dry-run"]) for _ in range(args.runs))
            fake, real = times["umockdev"], times["kernel"]
            print(f"{model:<40} {fake:8.1f}s {real:8.1f}s {real / fake:6.2f}x {real - startup:14.1f}s "
                  f"{(real - startup) / fake:6.2f}x")


if __name__ == "__main__":
    main()
