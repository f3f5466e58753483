"""The host-controller compatibility matrix: boot one module through each of its rig's USB ports K times.

Whether a module USB-boots can depend on the host controller and driver behind the port (the CM1 quirk,
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hil.control.hostctl import QUIRK_PHRASE, HostController, SpeedRecorder, identify, quirk_signature
from hil.control.lifecycle import Lifecycle
from hil.errors import HilError, InputError
from hil.usbboot.host import DEFAULT_SETTLE, UsbBootResult
from hil.usbboot.trace import Listener

#: Boot stages timed in the matrix (the settle pauses are fixed sleeps, not measurements).
STAGES = ("rom", "rom_transfer", "second_stage", "file_server", "mass_storage")
QUIRK = "cm1-quirk"  # an attempt's category when it failed with the quirk's signature
PASS = "pass"

Cable = Callable[[str], None]


@dataclass
class Attempt:
    """One USB boot into mass storage through one port."""

    rig: str
    model: str
    port: str
    controller: HostController
    attempt: int
    ok: bool
    category: str  # "pass", "cm1-quirk", or the failure's fault: "infrastructure", "product", "input"
    seconds: dict[str, float]  # completed stages
    speeds: dict[str, str]  # enumeration stage -> "full", "high", ...
    message: str = ""
    error: HilError | None = field(default=None, repr=False)
    result: UsbBootResult | None = field(default=None, repr=False)

    @property
    def quirk(self) -> bool:
        return self.category == QUIRK

    def describe(self) -> str:
        speeds = ", ".join(f"{k} {v}" for k, v in self.speeds.items()) or "speeds unknown"
        total = sum(self.seconds.values())
        outcome = f"ok in {total:.2f} s" if self.ok else f"FAILED ({self.category}): {self.message}"
        return f"{self.model} via {self.port} [{self.controller.label}] #{self.attempt}: {outcome}; {speeds}"


def _stage_seconds(stages: Sequence[Any]) -> dict[str, float]:
    """Duration of each completed timed stage (summed over its attempts) from StageTimings or their dicts."""
    seconds: dict[str, float] = {}
    for s in stages:
        name, ok, duration = (s["name"], s["ok"], s["duration"]) if isinstance(s, dict) else (s.name, s.ok, s.duration)
        if ok and name in STAGES:
            seconds[name] = seconds.get(name, 0.0) + float(duration)
    return seconds


def boot_once(lifecycle: Lifecycle, payload: str | Path | None, attempt: int = 1, *,
              controller: HostController | None = None, listener: Listener | None = None) -> Attempt:
    """Power-cycle the module into USB boot on the rig's (first) port and serve it into mass storage.

    A failure is returned, not raised: it is a data point of the matrix. ``listener`` sees the stages."""
    rig = lifecycle.rig
    port = rig.usb_port
    controller = controller or identify(port)
    recorder = SpeedRecorder(port, listener)
    options: dict[str, Any] = {"listener": recorder}
    if rig.virtual is not None:  # the module's readiness is modelled in device time
        options["settle"] = DEFAULT_SETTLE / rig.virtual.speedup
    lifecycle.off()
    try:
        result = lifecycle.mass_storage(payload, **options)
    except HilError as e:
        trace = e.evidence.get("trace") or {}
        quirk = quirk_signature(rig.model, e, recorder.speeds)
        category, message = (QUIRK, f"{QUIRK_PHRASE}: {quirk} ({e})") if quirk else (e.fault.value, str(e))
        return Attempt(rig.name, rig.model.name, port, controller, attempt, False, category,
                       _stage_seconds(trace.get("stages", [])), dict(recorder.speeds), message, error=e)
    finally:
        lifecycle.off()
    return Attempt(rig.name, rig.model.name, port, controller, attempt, True, PASS, _stage_seconds(result.stages),
                   dict(recorder.speeds), result=result)


def run_matrix(lifecycle: Lifecycle, attempts: int, payload: str | Path | None, store: MatrixStore, *,
               ports: Sequence[str] = (), cable: Cable | None = None,
               listener: Callable[[], Listener] | None = None,
               step: Callable[[str, int], AbstractContextManager[object]] = lambda port, n: contextlib.nullcontext(),
               progress: Callable[[Attempt], None] = lambda a: None) -> tuple[int, list[Attempt]]:
    """Boot through each port (default: all the rig's) ``attempts`` times; returns the run's id and attempts.

    Each attempt runs inside ``step(port, n)`` (a report step, say) with a fresh ``listener()``, and is handed
    to ``progress`` there once recorded."""
    rig = lifecycle.rig
    if attempts < 1:
        raise InputError(f"--attempts {attempts}: boot at least once per port", stage="matrix")
    unknown = [p for p in ports if p not in rig.usb_ports]
    if unknown:
        raise InputError(f"rig {rig.name} has no USB port {', '.join(unknown)}; its ports are "
                         f"{', '.join(rig.usb_ports)} ([usb] ports in {rig.path})", stage="matrix")
    run = store.begin(rig.name, attempts)
    done: list[Attempt] = []
    try:
        for port in ports or rig.usb_ports:
            lifecycle.off()
            if cable is not None:
                cable(port)
            lifecycle.rig = replace(rig, usb_ports=(port, *(p for p in rig.usb_ports if p != port)))
            controller = identify(port)
            for number in range(1, attempts + 1):
                with step(port, number):
                    result = boot_once(lifecycle, payload, number, controller=controller,
                                       listener=listener() if listener else None)
                    store.add(run, result)
                    done.append(result)
                    progress(result)
    finally:
        lifecycle.off()
        lifecycle.rig = rig
        if cable is not None:
            cable(rig.usb_port)
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
    quirks: int  # failures with the CM1 quirk's signature
    median: dict[str, float]  # stage -> median seconds over the attempts that completed it

    @property
    def rate(self) -> float:
        return self.passes / self.attempts if self.attempts else 0.0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started REAL, host TEXT, rig TEXT, attempts INTEGER);
CREATE TABLE IF NOT EXISTS attempts (
    run INTEGER REFERENCES runs(id), rig TEXT, model TEXT, port TEXT, controller TEXT, identity TEXT,
    attempt INTEGER, ok INTEGER, category TEXT, message TEXT, seconds TEXT, speeds TEXT);
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
                              sum(1 for r in rows if r[5] == QUIRK),
                              {s: statistics.median(times[s]) for s in STAGES if s in times}))
        return cells


def format_table(cells: Sequence[Cell]) -> str:
    """The matrix as text: one line per controller x model."""
    header = ["controller", "model", "ports", "this run", "history", "runs", "last runs", "quirk",
              *(f"{s} s" for s in STAGES)]
    lines = [header]
    for c in cells:
        lines.append([c.controller, c.model, ",".join(c.ports),
                      f"{c.run_passes}/{c.run_attempts}" if c.run_attempts else "-", f"{c.passes}/{c.attempts}",
                      str(len(c.per_run)), " ".join(f"{p}/{n}" for p, n in c.per_run[-5:]), str(c.quirks),
                      *(f"{c.median[s]:.3f}" if s in c.median else "-" for s in STAGES)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
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
                if cell.quirks:
                    text += f"\nCM1 quirk x{cell.quirks}"
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
