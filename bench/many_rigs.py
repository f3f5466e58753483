"""Many rigs on one controller: N virtual rigs flashing the same image at once, against the issue's targets.

Run as root: ``.venv/bin/python bench/many_rigs.py [--size-mib 256] [--rigs 1,2,4] [--rate 35]``
(``--size-mib 1024`` is the issue's size). Each rig is its own ``hil flash`` process with its own rig file (own
name, USB bus, GPIOs and state folder), which is what a controller running N rigs does; all share one image
cache (``HIL_CACHE_DIR``). For each N, side by side in one run:

- N flashes at once from a cold cache (the first flash of the night: the .xz is decoded);
- N flashes at once from a warm cache (every later flash: no decoder);
- the same N warm flashes one after another;
- N parallel ``xz -dc | dd`` pipelines into files (unthrottled: the decoder's own CPU and wall time).

CPU is counted per process tree from the kernel's accounting: ``wait4`` gives a flash's whole tree (user +
system, reaped children included); the virtual rig's share (the FUSE eMMC server process, and the threads named
``virtual-*`` / ``console-*`` inside the hil process: USB transport, module model, console) is sampled from
``/proc`` every 0.1 s and reported apart, and the framework's share is the difference. The kernel's own work
for the loop device and FUSE (kworkers) belongs to no process: the "machine" column is all CPU time the
machine spent (``/proc/stat``) during the run. Last, the CPU seconds per GiB of SHA-256 and of the comparison
verification uses (:mod:`hil.flash.digest`) on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from flash import bench_image  # noqa: E402  (bench/flash.py: the Raspberry-Pi-OS-Lite-shaped image)

from hil.flash import digest  # noqa: E402
from hil.flash.ranges import read_bmap  # noqa: E402
from hil.hostenv import outside_umockdev  # noqa: E402
from tests.rigfiles import virtual_rig_toml  # noqa: E402

MiB, GiB = 1024**2, 1024**3
TICK = os.sysconf("SC_CLK_TCK")
VIRTUAL_THREADS = ("virtual-", "console-")


@dataclass
class Cpu:
    """CPU seconds (user + system) of one run, split by who spent them."""

    total: float = 0.0  # every process the run started, from wait4
    virtual: float = 0.0  # the virtual rig's FUSE server process and threads, sampled from /proc
    machine: float = 0.0  # all CPU time of the machine during the run (/proc/stat)
    seen: dict[tuple[int, int], float] = field(default_factory=dict)  # (pid, tid) -> last sampled seconds

    @property
    def framework(self) -> float:
        return self.total - self.virtual


def _stat_seconds(path: str) -> tuple[str, float] | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _descendants(roots: set[int]) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(parents.get(pid, []))
    return found


def _sample(roots: set[int], cpu: Cpu) -> None:
    """The virtual rig's CPU so far: the FUSE server's whole process, and the hil process's virtual-* threads."""
    for pid in _descendants(roots):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"hil.virtual.throttlefs" in cmdline:
            got = _stat_seconds(f"/proc/{pid}/stat")
            if got:
                cpu.seen[(pid, 0)] = got[1]
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            got = _stat_seconds(f"/proc/{pid}/task/{tid}/stat")
            if got and got[0].startswith(VIRTUAL_THREADS):
                cpu.seen[(pid, int(tid))] = got[1]


def _machine_seconds() -> float:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    return busy / TICK


def run_all(commands: list[list[str]], env: dict[str, str], parallel: bool) -> tuple[float, Cpu]:
    """Wall seconds and CPU of ``commands`` run at once (or one after another); any failure ends the bench."""
    cpu = Cpu()
    machine = _machine_seconds()
    started = time.monotonic()
    batches = [commands] if parallel else [[c] for c in commands]
    for batch in batches:
        logs = {}
        for c in batch:
            log = tempfile.TemporaryFile()
            logs[subprocess.Popen(c, env=env, stdout=log, stderr=subprocess.STDOUT).pid] = (c, log)
        procs = {pid: c for pid, (c, _) in logs.items()}
        done = threading.Event()

        def sampler(pids: set[int] = set(procs)) -> None:
            while not done.wait(0.1):
                _sample(pids, cpu)

        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        left = set(procs)
        while left:
            pid, status, usage = os.wait4(-1, 0)
            if pid not in left:
                continue
            left.discard(pid)
            cpu.total += usage.ru_utime + usage.ru_stime
            if os.waitstatus_to_exitcode(status) != 0:
                done.set()
                log = logs[pid][1]
                log.seek(0)
                sys.stderr.buffer.write(log.read()[-4000:])
                sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(procs[pid])}")
        done.set()
        watcher.join()
        for _, log in logs.values():
            log.close()
    cpu.virtual = sum(cpu.seen.values())
    cpu.machine = _machine_seconds() - machine
    return time.monotonic() - started, cpu


def hash_cost(name: str, update: object, size: int = 256 * MiB) -> float:
    """CPU seconds per GiB of one hash over ``size`` bytes already in memory."""
    data = memoryview(os.urandom(4 * MiB))
    start = time.process_time()
    for _ in range(size // len(data)):
        update(data)  # type: ignore[operator]
    return (time.process_time() - start) * GiB / size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="image size (the issue asks for 1024)")
    parser.add_argument("--rigs", default="1,2,4", help="how many rigs at once, one row set each")
    parser.add_argument("--rate", type=float, default=35, help="each virtual eMMC's MB/s, read and write")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/cm-hil-bench"), help="keeps the built image")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (each virtual rig's eMMC is a loop device)")
    counts = [int(n) for n in args.rigs.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    raw, xz, bmap_path = bench_image(args.work, args.size_mib * MiB)
    image_size, mapped = raw.stat().st_size, read_bmap(bmap_path).mapped_bytes
    bare = args.work / "no-bmap"  # the .xz with no .bmap beside it: what a user downloads
    bare.mkdir(exist_ok=True)
    if not (bare / xz.name).exists():
        os.link(xz, bare / xz.name)
    image = bare / xz.name
    emmc = f"{-(-image_size // (256 * MiB)) * 256 + 256}MiB"
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="hil-bench-rigs-") as tmp:
        work = Path(tmp)
        env = {**outside_umockdev(), "HIL_CACHE_DIR": str(work / "cache")}
        flashes = []
        for i in range(max(counts)):
            rig = work / f"rig{i}.toml"
            rig.write_text(virtual_rig_toml(
                f"bench-rig{i}", "cm4", f"{60 + i}-1.4", state_dir=work / f"state{i}", emmc=emmc,
                power_gpio=5 + 3 * i, boot_gpio=6 + 3 * i, nwp_gpio=7 + 3 * i, speedup=20,
                emmc_speed={"write_mbps": args.rate, "read_mbps": args.rate}))
            flashes.append([sys.executable, "-m", "hil.cli", "flash", str(image), "--rig", str(rig),
                            "--no-customise"])
        print(f"image {raw.name}: {image_size / MiB:.0f} MiB, {mapped / MiB:.0f} MiB mapped, .xz "
              f"{xz.stat().st_size / MiB:.0f} MiB (no .bmap given); virtual cm4 rigs at {args.rate:g} MB/s",
              flush=True)
        solo = 0.0
        for n in counts:
            moved = 2 * mapped * n  # written + read back
            runs: list[tuple[str, float, Cpu]] = []
            shutil.rmtree(work / "cache", ignore_errors=True)
            runs.append((f"{n} at once, cold cache (decode)", *run_all(flashes[:n], env, True)))
            runs.append((f"{n} at once, from the cache", *run_all(flashes[:n], env, True)))
            if n == 1:
                solo = runs[-1][1]
            runs.append((f"{n} one after another, cache", *run_all(flashes[:n], env, False)))
            dd = [["bash", "-o", "pipefail", "-c", f"xz -dc {xz} | dd of={work}/dd{i}.img bs=4M status=none"]
                  for i in range(n)]
            wall, cpu = run_all(dd, env, True)
            for i in range(n):
                (work / f"dd{i}.img").unlink()
            rows.append((str(n), f"{n} x xz -dc | dd (to a file, write only)", f"{wall:.1f}",
                         f"{image_size * n / wall / 1e6:.0f}", f"{cpu.total * GiB / (image_size * n):.2f}", "",
                         f"{cpu.machine * GiB / (image_size * n):.2f}", ""))
            for label, wall, cpu in runs:
                note = ""
                if "from the cache" in label:
                    note = (f"aggregate {moved / wall / (n * args.rate * 1e6):.2f}x of {n}x{args.rate:g} (target >= 0.9)"
                            f"; wall {wall / solo:.2f}x one rig (target <= 1.15); framework "
                            f"{cpu.framework * GiB / moved:.2f} s/GiB (target <= 0.3)")
                rows.insert(len(rows) - 1, (str(n), label, f"{wall:.1f}", f"{moved / wall / 1e6:.0f}",
                                            f"{cpu.framework * GiB / moved:.2f}", f"{cpu.virtual * GiB / moved:.2f}",
                                            f"{cpu.machine * GiB / moved:.2f}", note))
            print(f"{n} rig(s): done", file=sys.stderr, flush=True)
    sha = hash_cost("sha256", hashlib.sha256().update)
    xxh = hash_cost(digest.NAME, lambda d: digest.piece_digest(d))
    rows.append(("-", "SHA-256 (hashlib), in memory", "", "", f"{sha:.2f}", "", "", "the image's identity only"))
    rows.append(("-", f"{digest.NAME} (verification)", "", "", f"{xxh:.2f}", "", "", "what verify compares"))
    header = ("rigs", "run", "wall s", "MB/s", "framework CPU s/GiB", "virtual rig CPU s/GiB",
              "machine CPU s/GiB", "against the targets")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print("MB/s and s/GiB count bytes written + read back (flashes) or decoded (xz | dd); CPU is user + system")
    return 0


if __name__ == "__main__":
    sys.exit(main())
