"""What the virtual module went through: stages reached, files requested, bytes received.

Every part of the model records into one journal, so ``hil virtual run`` and tests can report it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the journal started (monotonic)
    kind: str  # e.g. "power", "stage", "file", "bulk", "fault", "console"
    what: str
    details: dict[str, Any] = field(default_factory=dict)


class Journal:
    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._events: list[Event] = []

    def record(self, kind: str, what: str, **details: Any) -> None:
        with self._lock:
            self._events.append(Event(time.monotonic() - self._t0, kind, what, details))

    def events(self, kind: str | None = None) -> list[Event]:
        with self._lock:
            return [e for e in self._events if kind is None or e.kind == kind]

    def stages(self) -> list[str]:
        return [e.what for e in self.events("stage")]

    def summary(self) -> str:
        lines = []
        for e in self.events():
            extra = " ".join(f"{k}={v}" for k, v in e.details.items())
            lines.append(f"{e.t:9.3f}s  {e.kind:<8} {e.what}{'  ' + extra if extra else ''}")
        return "\n".join(lines)
