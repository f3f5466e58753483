"""Bench: host time from power-on to mass storage against the virtual module's own modelled delays.

Usage: ``python bench/usbboot.py [--speedup 10] [--rounds 3] [--settle 1.0]``. Each run happens in a
fresh ``umockdev-wrapper`` child process (one umockdev testbed per process), so a run is independent of
the previous one. "Overhead" is what the host adds beyond the device's modelled delays and its own
settle pauses: enumeration detection, transfers and file lookups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hil.models import MODELS  # noqa: E402
from hil.virtual.usb import side as virtual_side  # noqa: E402
from hil.virtual.usb import stage2  # noqa: E402

RUNS = (("cm1", "msd"), ("cm3", "msd"), ("cm4", "msd"), ("cm4", "mass-storage-gadget64"),
        ("cm5", "mass-storage-gadget64"))
PORT = "3-1.2"


def modelled_delay(kind: str) -> float:
    """Hardware seconds the virtual module spends on its own between power-on and mass storage."""
    chain = virtual_side.ROM_APPEARS + virtual_side.ROM_LEAVES + virtual_side.STAGE2_APPEARS + stage2.FIRST_REQUEST
    if kind == "msd":
        return chain + stage2.MSD_FIRMWARE_START + virtual_side.DONE_LEAVES + virtual_side.MSD_APPEARS
    return (chain + stage2.DDR_INIT + stage2.BOOTMAIN_START + stage2.RAMDISK_BOOT + virtual_side.DONE_LEAVES
            + virtual_side.GADGET_APPEARS)


def one(name: str, kind: str, speedup: float, settle: float) -> dict[str, object]:
    """One boot in this process (which runs under umockdev-wrapper)."""
    from hil.usbboot.host import UsbBoot
    from hil.virtual.journal import Journal
    from hil.virtual.timing import DeviceClock
    from hil.virtual.usb.payloads import make_payload
    from hil.virtual.usb.side import VirtualUsb
    from hil.virtual.usb.umockdev_bus import UsbBus

    with tempfile.TemporaryDirectory() as tmp:
        emmc = Path(tmp) / "emmc.img"
        with open(emmc, "wb") as f:
            f.truncate(64 * 1024 * 1024)
        payload = make_payload(Path(tmp), kind, (name,))
        side = VirtualUsb(MODELS[name], UsbBus.get().port(PORT), str(emmc), 64 * 1024 * 1024, None,
                          DeviceClock(speedup), Journal())
        try:
            start = time.monotonic()
            side.power_on(usb_boot=True)
            result = UsbBoot(PORT, payload, MODELS[name], settle=settle).run()
            total = time.monotonic() - start
        finally:
            side.power_off()
    bulk = [t for t in result.trace.transfers if t.kind == "bulk_out"]
    return {"total": total, "bytes": sum(t.actual for t in bulk), "bulk_s": sum(t.duration for t in bulk),
            "stages": {s.name: s.duration for s in result.stages}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=10.0, help="virtual module speed-up (default 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=1.0, help="host settle pause (default 1 s, as rpiboot)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, kind = args.one
        print(json.dumps(one(name, kind, args.speedup, args.settle)))
        return 0
    print(f"usbboot to mass storage, virtual speed-up x{args.speedup:g}, host settle {args.settle:g} s, "
          f"median of {args.rounds}")
    print(f"{'model':<6} {'payload':<22} {'device (s)':>10} {'settle (s)':>10} {'host (s)':>9} "
          f"{'overhead (s)':>12} {'bytes':>10} {'bulk MB/s':>9}")
    for name, kind in RUNS:
        runs = []
        for _ in range(args.rounds):
            cmd = ["umockdev-wrapper", sys.executable, __file__, "--one", name, kind,
                   "--speedup", str(args.speedup), "--settle", str(args.settle)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if done.returncode:
                print(f"{name} {kind}: run failed\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        device = modelled_delay(kind) / args.speedup
        host = statistics.median(r["total"] for r in runs)
        settles = 2 * args.settle
        size = runs[0]["bytes"]
        rate = statistics.median(r["bytes"] / r["bulk_s"] for r in runs) / 1e6
        print(f"{name:<6} {kind:<22} {device:>10.3f} {settles:>10.3f} {host:>9.3f} "
              f"{host - device - settles:>12.3f} {size:>10} {rate:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
