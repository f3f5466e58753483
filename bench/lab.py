"""Bench: what a labgrid place costs over the local lock, and how long reserving one among 20 places takes.

Usage: ``python bench/lab.py [--rounds 5] [--places 20]`` (as root: the virtual rig's eMMC is a loop device).
A labgrid coordinator and ``hil lab serve`` exporters run on 127.0.0.1 for the bench's duration. "A run" is
``hil power off --rig RIG``: the whole rig session (lock, virtual module up, safe state, lock released) of one
command, once with ``[lab] lock = "local"`` and once with ``lock = "labgrid"``, for the same virtual rig.
Reserving is ``hil lab reserve model=cm4 carrier=bench`` (connect, reserve, poll, acquire) and its release,
among ``--places`` places served by one exporter.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hil.hostenv import outside_umockdev  # noqa: E402
from hil.lab.coordinator import Coordinator  # noqa: E402

LOGS: list[Path] = []
RIG = """name = "{name}"
model = "cm4"
[emmc]
size = "64MiB"
[relays]
off_time = 0.05
[relays.power]
gpio = 17
[relays.nrpi_boot]
gpio = 27
[usb]
port = "{port}"
[console]
[virtual]
speedup = 20
state_dir = "{state}"
[lab]
lock = "{lock}"
coordinator = "{coordinator}"
[lab.tags]
carrier = "bench"
"""


@contextlib.contextmanager
def child(argv: list[str], folder: Path, name: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = folder / f"{name}.log"
    LOGS.append(log)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=outside_umockdev())
    try:
        yield proc, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait(what: str, check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            logs = "".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in LOGS)
            raise SystemExit(f"bench: {what} not within {timeout} s\n{logs}")
        time.sleep(0.2)
    return found


def hil(*args: str) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "hil.cli", *args], env=outside_umockdev(), capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"bench: hil {' '.join(args)} failed: {done.stderr}")
    return time.monotonic() - started


def rig_file(folder: Path, name: str, port: str, lock: str, coordinator: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(RIG.format(name=name, port=port, state=folder / "state" / name, lock=lock,
                               coordinator=coordinator))
    return path


def places_online(coordinator: str, names: set[str]) -> bool:
    with Coordinator(coordinator) as lab:
        views = lab.places()
    return all(n in views and views[n].available for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--places", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cm-hil-bench-lab-") as tmp:
        folder = Path(tmp)
        with child([sys.executable, "-m", "labgrid.remote.coordinator", "-l", "127.0.0.1:0"], folder,
                   "coordinator") as (_, log):
            coordinator = wait("the coordinator", lambda: (m := re.search(r"listening on (\S+)", log.read_text()))
                               and m.group(1))
            local = rig_file(folder, "bench-local", "30-1", "local", coordinator)
            placed = rig_file(folder, "bench-lab", "30-1", "labgrid", coordinator)
            many = [rig_file(folder, f"bench-{i:02d}", f"31-{i + 1}", "labgrid", coordinator)
                    for i in range(args.places)]
            serve = [sys.executable, "-m", "hil.cli", "lab", "serve", "--coordinator", coordinator]
            with child([*serve, "--controller", "bench-1", "--rig", str(placed)], folder, "exporter-1"), \
                    child([*serve, "--controller", "bench-2", "--rig", *map(str, many)], folder, "exporter-2"):
                wait("the places online", lambda: places_online(coordinator, {p.stem for p in [placed, *many]}))
                times: dict[str, list[float]] = {"local": [], "labgrid": []}
                for _ in range(args.rounds):
                    times["local"].append(hil("power", "off", "--rig", str(local)))
                    times["labgrid"].append(hil("power", "off", "--rig", str(placed)))
                reserve: list[float] = []
                release: list[float] = []
                for _ in range(args.rounds):
                    reserve.append(hil("lab", "reserve", "--coordinator", coordinator, "model=cm4",
                                       "carrier=bench"))
                    with Coordinator(coordinator) as lab:
                        held = next(v.name for v in lab.places().values() if v.acquired)
                    release.append(hil("lab", "release", "--coordinator", coordinator, held))
    local_s, lab_s = statistics.median(times["local"]), statistics.median(times["labgrid"])
    print(f"{'what':<44} {'median s':>9} {'min s':>7} {'max s':>7}")
    for label, values in ((f"run, local lock ({args.rounds} runs)", times["local"]),
                          (f"run, labgrid place ({args.rounds} runs)", times["labgrid"]),
                          (f"hil lab reserve among {args.places + 1} places", reserve),
                          ("hil lab release", release)):
        print(f"{label:<44} {statistics.median(values):>9.2f} {min(values):>7.2f} {max(values):>7.2f}")
    added = lab_s - local_s
    print(f"{'added cost of a labgrid-reserved run':<44} {added:>9.2f}   target < 2 s: "
          f"{'met' if added < 2.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
