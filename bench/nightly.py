"""Bench: wall time of the nightly job on the virtual CM4 (rigs/virtual-cm4.toml) with a 256 MiB image, by stage.

Usage: ``python bench/nightly.py [--rig rigs/virtual-cm4.toml] [--fill-mib 160]``. Two runs of ``hil nightly``:
the default test image (256 MiB, almost all of it free space, so little is written), and one whose root
filesystem carries ``--fill-mib`` of incompressible data, so the rig's eMMC speed model shows in the write and
verify stages. Stage times come from the Allure steps of the run (a stage seen several times is summed);
"suites" is the pytest child's wall time, "report" the HTML rendering. "flow" runs the nightly flow itself (rig
self-check, flash and boot); "all suites" adds the EEPROM, CM1-quirk and matrix suites, whose USB boots dominate.
Target: the flow under 30 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hil.image.build import ImageSpec, build_image  # noqa: E402
from hil.nightly import run_nightly  # noqa: E402

MiB = 1024**2
STAGES = ("usbboot.rom", "usbboot.rom.settle", "usbboot.rom_transfer", "usbboot.second_stage",
          "usbboot.second_stage.settle", "usbboot.file_server", "usbboot.mass_storage", "disk.discovery",
          "disk.guard", "flash.write", "flash.verify", "flash.partitions", "flash.build-id")


def _steps(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for step in node.get("steps", []):
        yield step
        yield from _steps(step)


def stage_times(results: Path) -> dict[str, float]:
    """Seconds per stage name, summed over every step of that name in the results."""
    times: dict[str, float] = defaultdict(float)
    for path in results.glob("*.json"):
        if not path.name.endswith(("-result.json", "-container.json")):
            continue
        data = json.loads(path.read_text())
        for node in [data, *data.get("befores", []), *data.get("afters", [])]:
            for step in _steps(node):
                name = step["name"]
                if name.startswith("boot ") and name.endswith(" from eMMC"):
                    name = "boot (power-on to shell)"
                times[name] += (step["stop"] - step["start"]) / 1000
    return times


def one(rig: str, image: Path | None, report: Path, *select: str) -> dict[str, float]:
    started = time.monotonic()
    result = run_nightly([rig], images=[str(image)] if image else [], report_dir=report, extra=["-q", *select])
    total = time.monotonic() - started
    if result.exit_code != 0:
        raise SystemExit(f"the nightly run failed (exit {int(result.exit_code)}); see {report}")
    times = stage_times(report / "allure-results")
    return {**{s: times.get(s, 0.0) for s in (*STAGES, "boot (power-on to shell)")}, **result.seconds,
            "total": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rig", default=str(REPO / "rigs" / "virtual-cm4.toml"))
    parser.add_argument("--fill-mib", type=int, default=160)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hil-bench-nightly-") as tmp:
        filled = build_image(Path(tmp) / "filled.img",
                             ImageSpec(model="cm4", size=256 * MiB, fill=args.fill_mib * MiB)).path
        flow = ("-k", "rig_selfcheck or flash_and_boot")
        runs = {"flow, test image": one(args.rig, None, Path(tmp) / "flow", *flow),
                f"flow, +{args.fill_mib} MiB": one(args.rig, filled, Path(tmp) / "flow-filled", *flow),
                "all suites": one(args.rig, None, Path(tmp) / "sparse"),
                f"all, +{args.fill_mib} MiB": one(args.rig, filled, Path(tmp) / "filled")}
    print(f"\nhil nightly --rig {args.rig}, 256 MiB image (seconds)")
    header = f"{'stage':<30}" + "".join(f"{name:>18}" for name in runs)
    print(header + "\n" + "-" * len(header))
    for stage in next(iter(runs.values())):
        print(f"{stage:<30}" + "".join(f"{r[stage]:>18.2f}" for r in runs.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
