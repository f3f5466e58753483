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
    seen: dict[tuple[int, int, int], float] = field(default_factory=dict)  # (root, pid, tid) -> last sampled s

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


def _sample(root: int, cpu: Cpu) -> tuple[float, float]:
    """CPU so far of one flash's process tree: (framework, virtual rig). The virtual rig is the FUSE server's
    whole process and the hil process's virtual-* / console-* threads; the framework is the rest."""
    framework = 0.0
    for pid in _descendants({root}):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        whole = _stat_seconds(f"/proc/{pid}/stat")
        if whole is None:
            continue
        if b"hil.virtual.throttlefs" in cmdline:
            cpu.seen[(root, pid, 0)] = whole[1]
            continue
        framework += whole[1]
        for tid in tids:
            got = _stat_seconds(f"/proc/{pid}/task/{tid}/stat")
            if got and got[0].startswith(VIRTUAL_THREADS):
                cpu.seen[(root, pid, int(tid))] = got[1]
                framework -= got[1]
    # the last value seen of each: the FUSE server and the threads may be gone by the time a phase ends
    return framework, sum(v for k, v in cpu.seen.items() if k[0] == root)


@dataclass
class Phase:
    """One flash's write + read-back, seen from outside: from the line naming the disk (written just before the
    write starts) to the line reporting the read-back (just after it ends)."""

    log: Path
    start: tuple[float, float, float] | None = None  # (monotonic, framework CPU, virtual CPU)
    end: tuple[float, float, float] | None = None

    def watch(self, root: int, cpu: Cpu) -> None:
        if self.end is not None:
            return
        text = self.log.read_text(errors="replace")
        if self.start is None and "\ndisk    " in "\n" + text:
            self.start = (time.monotonic(), *_sample(root, cpu))
        elif self.start is not None and "\nverify  " in "\n" + text:
            self.end = (time.monotonic(), *_sample(root, cpu))


def _machine_seconds() -> float:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    return busy / TICK


def run_all(commands: list[list[str]], env: dict[str, str], parallel: bool,
            logs_dir: Path) -> tuple[float, Cpu, list[Phase]]:
    """Wall seconds and CPU of ``commands`` run at once (or one after another), and each one's write + read-back
    phase (of a flash); any failure ends the bench."""
    cpu = Cpu()
    phases: list[Phase] = []
    machine = _machine_seconds()
    started = time.monotonic()
    batches = [commands] if parallel else [[c] for c in commands]
    for batch in batches:
        procs: dict[int, tuple[list[str], Phase]] = {}
        for c in batch:
            phase = Phase(logs_dir / f"run{len(phases)}.log")
            phases.append(phase)
            with open(phase.log, "wb") as log:
                procs[subprocess.Popen(c, env=env, stdout=log, stderr=subprocess.STDOUT).pid] = (c, phase)
        done = threading.Event()

        def sampler(watched: dict[int, tuple[list[str], Phase]] = procs, done: threading.Event = done) -> None:
            while not done.wait(0.05):
                for pid, (_, phase) in watched.items():
                    phase.watch(pid, cpu)
                    _sample(pid, cpu)

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
                sys.stderr.write(procs[pid][1].log.read_text(errors="replace")[-4000:])
                sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(procs[pid][0])}")
        done.set()
        watcher.join()
    cpu.virtual = sum(cpu.seen.values())
    cpu.machine = _machine_seconds() - machine
    return time.monotonic() - started, cpu, phases


def phase_totals(phases: list[Phase], parallel: bool) -> tuple[float, float, float]:
    """Seconds, framework CPU and virtual-rig CPU of the runs' write + read-back phases (0 where unseen)."""
    seen = [(p.start, p.end) for p in phases if p.start is not None and p.end is not None]
    if len(seen) != len(phases):
        return 0.0, 0.0, 0.0
    overall = max(e[0] for _, e in seen) - min(s[0] for s, _ in seen)
    window = overall if parallel else sum(e[0] - s[0] for s, e in seen)
    return window, sum(e[1] - s[1] for s, e in seen), sum(e[2] - s[2] for s, e in seen)


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
            runs: list[tuple[str, float, Cpu, list[Phase]]] = []
            shutil.rmtree(work / "cache", ignore_errors=True)
            runs.append((f"{n} at once, cold cache (decode)", *run_all(flashes[:n], env, True, work)))
            runs.append((f"{n} at once, from the cache", *run_all(flashes[:n], env, True, work)))
            runs.append((f"{n} one after another, cache", *run_all(flashes[:n], env, False, work)))
            dd = [["bash", "-o", "pipefail", "-c", f"xz -dc {xz} | dd of={work}/dd{i}.img bs=4M status=none"]
                  for i in range(n)]
            dd_wall, dd_cpu, _ = run_all(dd, env, True, work)
            for i in range(n):
                (work / f"dd{i}.img").unlink()
            for label, wall, cpu, phases in runs:
                window, framework, virtual = phase_totals(phases, parallel="at once" in label)
                if n == 1 and "from the cache" in label:
                    solo = window
                note = ""
                if "at once, from the cache" in label and window:
                    note = (f"aggregate {moved / window / (n * args.rate * 1e6):.2f}x {n}x{args.rate:g} MB/s "
                            f"(>= 0.9); {window / solo:.2f}x one rig's time (<= 1.15); framework "
                            f"{framework * GiB / moved:.2f} s/GiB (<= 0.3)")
                rows.append((str(n), label, f"{wall:.1f}", f"{cpu.framework * GiB / moved:.2f}",
                             f"{cpu.virtual * GiB / moved:.2f}", f"{cpu.machine * GiB / moved:.2f}",
                             f"{window:.1f}", f"{moved / window / 1e6:.1f}" if window else "n/a",
                             f"{framework * GiB / moved:.2f}", f"{virtual * GiB / moved:.2f}", note))
            decoded = image_size * n
            rows.append((str(n), f"{n} x xz -dc | dd (file, unthrottled)", f"{dd_wall:.1f}",
                         f"{dd_cpu.total * GiB / decoded:.2f}", "", f"{dd_cpu.machine * GiB / decoded:.2f}",
                         "", f"{decoded / dd_wall / 1e6:.0f} decoded", "", "", "s/GiB of decoded bytes"))
            print(f"{n} rig(s): done", file=sys.stderr, flush=True)
    sha = hash_cost("sha256", hashlib.sha256().update)
    xxh = hash_cost(digest.NAME, lambda d: digest.piece_digest(d))
    rows.append(("-", "SHA-256 (hashlib), in memory", "", f"{sha:.2f}", "", "", "", "", "", "",
                 "CPU s/GiB; the image's identity only"))
    rows.append(("-", f"{digest.NAME}", "", f"{xxh:.2f}", "", "", "", "", "", "", "CPU s/GiB; what verify compares"))
    header = ("rigs", "run", "command s", "fw s/GiB", "virt s/GiB", "machine s/GiB", "write+verify s",
              "MB/s", "fw s/GiB", "virt s/GiB", "against the targets (write + verify)")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print("command: the whole `hil flash` (start-up, USB boot, disk, write, read-back, checks); write+verify: from\n"
          "the disk found to the read-back done (all rigs' window when at once, the sum one after another).\n"
          "fw = the framework's processes, virt = the virtual rig's (FUSE server, virtual-* threads), machine = all\n"
          "CPU the machine spent (kernel loop/FUSE work and anything else running included). s/GiB per GiB\n"
          "written + read back; CPU = user + system.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
