"""How a long write shows its progress: a redrawn bar on a terminal, a plain line every few seconds in a CI log
(where a bar would arrive all at once at the end), or one JSON object per line for a machine.

A figure is ``done`` of ``total`` bytes; ``total`` is what will really be written (the mapped bytes) when known,
so the bar ends at 100 %, not where the image's last mapped byte happens to lie.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from hil.units import human_size


class Progress:
    """Shows one phase (``write``, ``verify``) at a time; subclasses say how."""

    def __init__(self, every: float):
        self.every = every
        self.phase = ""
        self.shown = 0.0
        self.last: tuple[int, int | None, float | None, float] | None = None

    def update(self, phase: str, done: int, total: int | None, seconds: float,
               fraction: float | None = None) -> None:
        """``fraction`` overrides done/total when only the image position tells how far it is."""
        if phase != self.phase:
            self.end()
            self.phase = phase
        if fraction is None and total:
            fraction = min(1.0, done / total)
        self.last = (done, total, fraction, seconds)
        now = time.monotonic()
        if now - self.shown >= self.every:
            self.shown = now
            self.show(done, total, fraction, seconds)

    def end(self) -> None:
        """The phase is over: its final figures shown once more (a skipped last update would leave it at 97 %)."""
        if self.last is not None:
            self.show(*self.last)
            self.finish()
        self.last, self.shown = None, 0.0

    def show(self, done: int, total: int | None, fraction: float | None, seconds: float) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


def rate_and_eta(done: int, fraction: float | None, seconds: float) -> tuple[float, float | None]:
    """MB/s so far and the seconds left at that pace (None: not known yet)."""
    rate = done / seconds / 1e6 if seconds > 0 else 0.0
    if fraction is None or fraction <= 0 or seconds <= 0:
        return rate, None
    return rate, seconds * (1 - fraction) / fraction


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds + 0.5)
    return f"{s // 60:02d}:{s % 60:02d}"


class Bar(Progress):
    """A terminal: one line redrawn in place a few times a second."""

    def __init__(self, stream: TextIO):
        super().__init__(every=0.2)
        self.stream = stream

    def show(self, done: int, total: int | None, fraction: float | None, seconds: float) -> None:
        rate, eta = rate_and_eta(done, fraction, seconds)
        bar = "#" * int(30 * fraction) if fraction is not None else ""
        share = f"{fraction:4.0%}" if fraction is not None else "    "
        of = f" of {human_size(total)}" if total else ""
        print(f"\r{self.phase:<6} [{bar:<30}] {share} {human_size(done)}{of}, {rate:.1f} MB/s, ETA {_clock(eta)}   ",
              end="", file=self.stream, flush=True)

    def finish(self) -> None:
        print(file=self.stream, flush=True)


class Lines(Progress):
    """A log that is not a terminal (CI): a whole line every ``every`` seconds, flushed at once."""

    def __init__(self, stream: TextIO, every: float):
        super().__init__(every)
        self.stream = stream

    def show(self, done: int, total: int | None, fraction: float | None, seconds: float) -> None:
        rate, eta = rate_and_eta(done, fraction, seconds)
        share = f"{fraction:.0%} " if fraction is not None else ""
        of = f" of {human_size(total)}" if total else ""
        left = f", {eta:.0f} s left" if eta is not None else ""
        print(f"{self.phase:<6}  {share}{human_size(done)}{of} in {seconds:.0f} s, {rate:.1f} MB/s{left}",
              file=self.stream, flush=True)


class JsonEvents(Progress):
    """For machines: ``{"event": "progress", ...}`` objects, one per line (see :func:`emit`)."""

    def __init__(self, stream: TextIO, every: float):
        super().__init__(every)
        self.stream = stream

    def show(self, done: int, total: int | None, fraction: float | None, seconds: float) -> None:
        rate, eta = rate_and_eta(done, fraction, seconds)
        emit(self.stream, "progress", phase=self.phase, bytes=done, total=total,
             fraction=None if fraction is None else round(fraction, 4), seconds=round(seconds, 3),
             mbps=round(rate, 2), eta_seconds=None if eta is None else round(eta, 1))


def emit(stream: TextIO, event: str, **fields: object) -> None:
    """One JSON event line, flushed: a reader sees it while the command still runs."""
    print(json.dumps({"event": event, **fields}), file=stream, flush=True)


def progress_for(json_events: bool, every: float) -> Progress:
    """JSON on stdout when asked; else a bar when stderr is a terminal, plain lines when it is not."""
    if json_events:
        return JsonEvents(sys.stdout, every)
    return Bar(sys.stderr) if sys.stderr.isatty() else Lines(sys.stderr, every)
