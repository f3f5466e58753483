"""The host-controller compatibility matrix: boot one module through each of its rig's USB ports K times.

Whether a module USB-boots can depend on the host controller and driver behind the port (the CM1 note,
usbboot-protocol.md section 6; full-speed fallbacks behind hubs, section 9.6). The matrix tells: controller
x module model -> passes/attempts and the median time of each boot stage. Every attempt is kept in a small
SQLite file (``reports/matrix.db``), so a later run adds to the history and a flaky port shows as such.

The module is cabled to one port at a time; ``cable(port)`` moves it (a virtual rig moves its own cable,
a real one needs a USB switch or a person, one ``--port`` per run).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hil.control.hostctl import HostController, SpeedRecorder, identify
from hil.control.lifecycle import Lifecycle
from hil.control.portevidence import PortEvidence
from hil.errors import Fault, HilError, InputError
from hil.report.environment import HOST_INCOMPATIBILITY_PHRASE
from hil.usbboot.host import UsbBootResult
from hil.usbboot.trace import Listener
from hil.usbport import UsbPort

#: Boot stages timed in the matrix (the settle pauses are fixed sleeps, not measurements).
STAGES = ("rom", "rom_transfer", "second_stage", "file_server", "mass_storage")
HOST = "host-incompatibility"  # a failure's category once classify() has the evidence for it
PASS = "pass"

Cable = Callable[[str], None]
Capture = Callable[[str], PortEvidence]  # port -> the evidence recorder of one attempt


@dataclass
class Attempt:
    """One USB boot into mass storage through one port."""

    rig: str
    model: str
    port: str
    controller: HostController
    attempt: int
    ok: bool
    category: str  # "pass", "host-incompatibility", or the failure's fault: "infrastructure", "product", "input"
    seconds: dict[str, float]  # completed stages
    speeds: dict[str, str]  # enumeration stage -> "full", "high", ...
    message: str = ""
    error: HilError | None = field(default=None, repr=False)
    result: UsbBootResult | None = field(default=None, repr=False)
    evidence: dict[str, Any] = field(default_factory=dict, repr=False)  # what a host bug report needs

    @property
    def incompatible(self) -> bool:
        return self.category == HOST

    @property
    def host(self) -> str:
        """The controller as a person tells it apart: its label and its root hub's product string."""
        root = f"; {self.controller.hubs[0].product}" if self.controller.hubs else ""
        return f"{self.controller.label}{root}"

    def describe(self) -> str:
        speeds = ", ".join(f"{k} {v}" for k, v in self.speeds.items()) or "speeds unknown"
        total = sum(self.seconds.values())
        outcome = f"ok in {total:.2f} s" if self.ok else f"FAILED ({self.category}): {self.message}"
        rom = self.rom_attempts()
        tries = f"; ROM exchanges: {'; '.join(rom)}" if len(rom) > 1 or any("status" in r for r in rom) else ""
        return f"{self.model} via {self.port} [{self.host}] #{self.attempt}: {outcome}; {speeds}{tries}"

    def rom_attempts(self) -> list[str]:
        """Each ROM exchange's outcome ("ok", "status 0x...", a failed transfer)."""
        records = (self.result.rom_attempts if self.result is not None
                   else self.error.evidence.get("rom_attempts", []) if self.error is not None else [])
        return [str(r.get("outcome", "?")) for r in records]


def _stage_seconds(stages: Sequence[Any]) -> dict[str, float]:
    """Duration of each completed timed stage (summed over its attempts) from StageTimings or their dicts."""
    seconds: dict[str, float] = {}
    for s in stages:
        name, ok, duration = (s["name"], s["ok"], s["duration"]) if isinstance(s, dict) else (s.name, s.ok, s.duration)
        if ok and name in STAGES:
            seconds[name] = seconds.get(name, 0.0) + float(duration)
    return seconds


def boot_once(lifecycle: Lifecycle, payload: str | Path | None, attempt: int = 1, *,
              controller: HostController | None = None, listener: Listener | None = None,
              capture: Capture = PortEvidence) -> Attempt:
    """Power-cycle the module into USB boot on the rig's (first) port and serve it into mass storage.

    A failure is returned, not raised: it is a data point of the matrix. ``listener`` sees the stages;
    ``capture(port)`` records the kernel log and usbmon evidence while the attempt runs."""
    rig = lifecycle.rig
    port = rig.usb_port
    controller = controller or identify(port)
    recorder = SpeedRecorder(port, listener)
    lifecycle.off()
    failure: HilError | None = None
    try:
        with capture(port) as evidence:
            try:
                result = lifecycle.mass_storage(payload, listener=recorder)
            except HilError as e:
                failure = e
    finally:
        lifecycle.off()
    facts = {**evidence.to_dict(), "speeds": dict(recorder.speeds), "controller": controller.to_dict()}
    if failure is not None:
        trace = failure.evidence.get("trace") or {}
        return Attempt(rig.name, rig.model.name, port, controller, attempt, False, failure.fault.value,
                       _stage_seconds(trace.get("stages", [])), dict(recorder.speeds), str(failure), error=failure,
                       evidence=facts)
    return Attempt(rig.name, rig.model.name, port, controller, attempt, True, PASS, _stage_seconds(result.stages),
                   dict(recorder.speeds), result=result, evidence=facts)


def classify(attempts: Sequence[Attempt], history: Mapping[str, tuple[int, int]] | None = None) -> list[Attempt]:
    """Call an infrastructure failure a host-controller incompatibility only on evidence; returns those changed.

    Evidence is either that the same module (same rig) booted through another port in this run, or that this
    port's ``history`` (port -> (passes, attempts) of this rig over all runs) shows it failing most of the time
    while another port passes most of the time. Without either, a failure keeps its fault: a cable, power or
    hub problem must not be filed as a known incompatibility."""
    booted: dict[str, dict[str, str]] = {}
    for a in attempts:
        if a.ok:
            booted.setdefault(a.rig, {})[a.port] = a.host
    changed = []
    for a in attempts:
        if a.ok or a.category != Fault.INFRASTRUCTURE.value:
            continue
        elsewhere = {p: label for p, label in booted.get(a.rig, {}).items() if p != a.port}
        why = ""
        if elsewhere:
            why = (f"the same {a.model} booted through " + ", ".join(f"{p} [{label}]" for p, label in elsewhere.items())
                   + " in this run")
        elif history:
            passes, tries = history.get(a.port, (0, 0))
            good = {p: h for p, h in history.items() if p != a.port and 2 * h[0] > h[1]}
            if tries and 2 * passes < tries and good:
                why = (f"port {a.port} booted {passes}/{tries} times in this rig's history while "
                       + ", ".join(f"{p} booted {h[0]}/{h[1]}" for p, h in good.items()))
        if why:
            a.category = HOST
            a.message = f"{HOST_INCOMPATIBILITY_PHRASE} on {a.port} [{a.host}]: {why}. {a.message}"
            changed.append(a)
    return changed


def run_matrix(lifecycle: Lifecycle, attempts: int, payload: str | Path | None, store: MatrixStore, *,
               ports: Sequence[str] = (), cable: Cable | None = None,
               listener: Callable[[], Listener] | None = None,
               step: Callable[[str, int], AbstractContextManager[object]] = lambda port, n: contextlib.nullcontext(),
               progress: Callable[[Attempt], None] = lambda a: None,
               capture: Capture = PortEvidence) -> tuple[int, list[Attempt]]:
    """Boot through each port (default: all the rig's) ``attempts`` times; returns the run's id and attempts.

    Each attempt runs inside ``step(port, n)`` (a report step, say) with a fresh ``listener()``, and is handed
    to ``progress`` there once recorded. At the end the failures are classified (:func:`classify`) against
    this run and the port history, and the store is told."""
    rig = lifecycle.rig
    if attempts < 1:
        raise InputError(f"--attempts {attempts}: boot at least once per port", stage="matrix")
    wanted = [UsbPort(p) for p in ports]  # a command line's ports: parsed like the rig file's
    unknown = [p for p in wanted if p not in rig.usb_ports]
    if unknown:
        raise InputError(f"rig {rig.name} has no USB port {', '.join(unknown)}; its ports are "
                         f"{', '.join(rig.usb_ports)} ([usb] ports in {rig.path})", stage="matrix")
    run = store.begin(rig.name, attempts)
    done: list[Attempt] = []
    try:
        for port in wanted or rig.usb_ports:
            lifecycle.off()
            if cable is not None:
                cable(port)
            lifecycle.rig = replace(rig, usb_ports=(port, *(p for p in rig.usb_ports if p != port)))
            controller = identify(port)
            for number in range(1, attempts + 1):
                with step(port, number):
                    result = boot_once(lifecycle, payload, number, controller=controller,
                                       listener=listener() if listener else None, capture=capture)
                    store.add(run, result)
                    done.append(result)
                    progress(result)
    finally:
        lifecycle.off()
        lifecycle.rig = rig
        if cable is not None:
            cable(rig.usb_port)
    for a in classify(done, store.port_history(rig.name)):
        store.reclassify(run, a)
    return run, done


@dataclass
class Cell:
    """One controller x model square of the matrix, over the whole history."""

    controller: str
    model: str
    ports: list[str]
    passes: int
    attempts: int
    per_run: list[tuple[int, int]]  # (passes, attempts) of each run, oldest first
    run_passes: int  # the run asked about (0/0 if it did not touch this square)
    run_attempts: int
    incompatible: int  # failures classified as host-controller incompatibilities
    median: dict[str, float]  # stage -> median seconds over the attempts that completed it

    @property
    def rate(self) -> float:
        return self.passes / self.attempts if self.attempts else 0.0


@dataclass
class PortRuns:
    """One rig's port over the matrix runs that booted through it (the per-port history a nightly report shows)."""

    rig: str
    port: str
    controller: str  # as the newest run saw it
    runs: list[tuple[float, int, int]]  # (started, passes, attempts) of each run, oldest first

    @property
    def passes(self) -> int:
        return sum(p for _, p, _ in self.runs)

    @property
    def attempts(self) -> int:
        return sum(n for _, _, n in self.runs)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started REAL, host TEXT, rig TEXT, attempts INTEGER);
CREATE TABLE IF NOT EXISTS attempts (
    run INTEGER REFERENCES runs(id), rig TEXT, model TEXT, port TEXT, controller TEXT, identity TEXT,
    attempt INTEGER, ok INTEGER, category TEXT, message TEXT, seconds TEXT, speeds TEXT);
CREATE TABLE IF NOT EXISTS evidence (run INTEGER, port TEXT, attempt INTEGER, evidence TEXT);
"""


class MatrixStore:
    """Every attempt of every run, in ``DIR/matrix.db``."""

    def __init__(self, reports: Path):
        reports.mkdir(parents=True, exist_ok=True)
        self.path = reports / "matrix.db"
        self._db = sqlite3.connect(self.path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> MatrixStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin(self, rig: str, attempts: int) -> int:
        with self._db:
            cursor = self._db.execute("INSERT INTO runs (started, host, rig, attempts) VALUES (?, ?, ?, ?)",
                                      (time.time(), socket.gethostname(), rig, attempts))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def add(self, run: int, a: Attempt) -> None:
        with self._db:
            self._db.execute("INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (run, a.rig, a.model, a.port, a.controller.label, json.dumps(a.controller.to_dict()),
                              a.attempt, int(a.ok), a.category, a.message, json.dumps(a.seconds),
                              json.dumps(a.speeds)))
            self._db.execute("INSERT INTO evidence VALUES (?, ?, ?, ?)",
                             (run, a.port, a.attempt, json.dumps(a.evidence, default=str)))

    def reclassify(self, run: int, a: Attempt) -> None:
        with self._db:
            self._db.execute("UPDATE attempts SET category = ?, message = ? WHERE run = ? AND port = ? AND attempt = ?",
                             (a.category, a.message, run, a.port, a.attempt))

    def port_history(self, rig: str) -> dict[str, tuple[int, int]]:
        """port -> (passes, attempts) of ``rig`` over every run."""
        rows = self._db.execute("SELECT port, SUM(ok), COUNT(*) FROM attempts WHERE rig = ? GROUP BY port", (rig,))
        return {port: (int(passes), int(count)) for port, passes, count in rows}

    def port_runs(self, rigs: Sequence[str]) -> list[PortRuns]:
        """Each port of ``rigs`` with its runs, by rig and port."""
        rows = self._db.execute(
            "SELECT a.rig, a.port, a.controller, r.started, SUM(a.ok), COUNT(*) FROM attempts a JOIN runs r "
            f"ON r.id = a.run WHERE a.rig IN ({', '.join('?' * len(rigs))}) GROUP BY a.rig, a.port, a.run "
            "ORDER BY a.rig, a.port, a.run", tuple(rigs))
        found: dict[tuple[str, str], PortRuns] = {}
        for rig, port, controller, started, passes, count in rows:
            entry = found.setdefault((rig, port), PortRuns(rig, port, controller, []))
            entry.controller = controller
            entry.runs.append((float(started), int(passes), int(count)))
        return list(found.values())

    def evidence(self, run: int, port: str, attempt: int) -> dict[str, Any]:
        row = self._db.execute("SELECT evidence FROM evidence WHERE run = ? AND port = ? AND attempt = ?",
                               (run, port, attempt)).fetchone()
        return json.loads(row[0]) if row else {}

    def runs(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def _rows(self) -> Iterator[tuple[Any, ...]]:
        yield from self._db.execute("SELECT run, controller, model, port, ok, category, seconds FROM attempts "
                                    "ORDER BY run, rowid")

    def cells(self, run: int | None = None) -> list[Cell]:
        """The matrix over the whole history; ``run`` picks the run whose own counts are shown too."""
        grouped: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        for row in self._rows():
            grouped.setdefault((row[1], row[2]), []).append(row)
        cells = []
        for (controller, model), rows in sorted(grouped.items()):
            per_run: dict[int, list[int]] = {}
            times: dict[str, list[float]] = {}
            for r in rows:
                counts = per_run.setdefault(r[0], [0, 0])
                counts[0] += r[4]
                counts[1] += 1
                for stage, seconds in json.loads(r[6]).items():
                    times.setdefault(stage, []).append(seconds)
            this = per_run.get(run, [0, 0]) if run is not None else [0, 0]
            cells.append(Cell(controller, model, sorted({r[3] for r in rows}), sum(r[4] for r in rows), len(rows),
                              [(p, n) for p, n in per_run.values()], this[0], this[1],
                              sum(1 for r in rows if r[5] == HOST),
                              {s: statistics.median(times[s]) for s in STAGES if s in times}))
        return cells


def format_table(cells: Sequence[Cell]) -> str:
    """The matrix as text: one line per controller x model."""
    header = ["controller", "model", "ports", "this run", "history", "runs", "last runs", "host-incompat",
              *(f"{s} s" for s in STAGES)]
    lines = [header]
    for c in cells:
        lines.append([c.controller, c.model, ",".join(c.ports),
                      f"{c.run_passes}/{c.run_attempts}" if c.run_attempts else "-", f"{c.passes}/{c.attempts}",
                      str(len(c.per_run)), " ".join(f"{p}/{n}" for p, n in c.per_run[-5:]), str(c.incompatible),
                      *(f"{c.median[s]:.3f}" if s in c.median else "-" for s in STAGES)])
    return _columns(lines)


def format_port_history(ports: Sequence[PortRuns], last: int = 10) -> str:
    """Each port's passes/attempts run by run (the newest ``last`` runs), with the newest run's verdict."""
    header = ["rig", "port", "controller", "newest run", "at", "runs", "all runs", "by run, oldest first"]
    lines = [header]
    for p in ports:
        _, passes, tries = p.runs[-1]
        verdict = "pass" if passes == tries else "FAIL" if passes == 0 else "flaky"
        lines.append([p.rig, p.port, p.controller, f"{verdict} {passes}/{tries}",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(p.runs[-1][0])), str(len(p.runs)),
                      f"{p.passes}/{p.attempts}", " ".join(f"{ok}/{n}" for _, ok, n in p.runs[-last:])])
    return _columns(lines)


def _columns(lines: list[list[str]]) -> str:
    """Rows of cells as text columns, the first row the header."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in lines) + "\n"


def plot(cells: Sequence[Cell], path: Path, title: str = "USB boot: host controller x module") -> Path:
    """A picture of the matrix: pass rate per controller x model (left), median stage times (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    controllers = sorted({c.controller for c in cells})
    models = sorted({c.model for c in cells})
    by_key = {(c.controller, c.model): c for c in cells}
    fig, (left, right) = plt.subplots(1, 2, figsize=(6 + 2.2 * len(models), 1.6 + 1.1 * len(controllers)),
                                      gridspec_kw={"width_ratios": [max(1, len(models)), 2]})
    rates = [[by_key[(k, m)].rate if (k, m) in by_key else float("nan") for m in models] for k in controllers]
    left.imshow(rates, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    left.set_xticks(range(len(models)), models)
    left.set_yticks(range(len(controllers)), [k.replace(" (", "\n(") for k in controllers], fontsize=8)
    left.set_title("passes / attempts (all runs)")
    for y, k in enumerate(controllers):
        for x, m in enumerate(models):
            cell = by_key.get((k, m))
            if cell is not None:
                text = f"{cell.passes}/{cell.attempts}\n{len(cell.per_run)} run(s)"
                if cell.run_attempts:
                    text += f"\nthis run {cell.run_passes}/{cell.run_attempts}"
                if cell.incompatible:
                    text += f"\nhost-incompatible x{cell.incompatible}"
                left.text(x, y, text, ha="center", va="center", fontsize=8,
                          bbox={"facecolor": "white", "alpha": 0.75, "linewidth": 0})
    labels = [f"{c.model} @ {c.controller.split(' (')[0]}" for c in cells]
    offsets = [0.0] * len(cells)
    for stage in STAGES:
        widths = [c.median.get(stage, 0.0) for c in cells]
        right.barh(range(len(cells)), widths, left=offsets, label=stage)
        offsets = [o + w for o, w in zip(offsets, widths, strict=True)]
    for y, c in enumerate(cells):
        if not c.passes:
            right.text(sum(c.median.values()), y, " no boot completed", va="center", fontsize=8)
    right.set_yticks(range(len(cells)), labels, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("median seconds per stage (all runs)")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
