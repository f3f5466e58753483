"""What the host did on the wire and how long each stage took.

Every transfer is recorded as it happened so that a failure report shows exactly how far the conversation
got (usbboot-protocol.md sections 2-4), and nightly runs can trend stage timings per host controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Transfer:
    """One USB transfer. ``kind`` is ``control_out``, ``control_in`` or ``bulk_out``."""

    t: float  # seconds since the session started
    stage: str
    kind: str
    request_type: int | None  # bmRequestType; None for bulk
    request: int | None  # bRequest; None for bulk
    value: int | None  # wValue; None for bulk
    index: int | None  # wIndex; None for bulk
    endpoint: int  # 0 for control
    length: int  # wLength / bytes offered
    actual: int  # bytes moved
    duration: float
    result: str  # "ok" or the failure: timeout, pipe, no_device, io, ...
    note: str = ""


@dataclass
class StageTiming:
    name: str
    start: float  # seconds since the session started
    duration: float = 0.0
    ok: bool = False
    attempt: int = 1
    detail: str = ""


@dataclass(frozen=True)
class FileServed:
    name: str
    size: int  # 0 = missing (indistinguishable on the wire, section 4.2)
    source: str  # where it came from: a path, "bootfiles.bin:<member>", or "" when missing


class Listener:
    """Hooks for a live display; the default does nothing."""

    def stage_started(self, stage: StageTiming) -> None:
        pass

    def stage_ended(self, stage: StageTiming) -> None:
        pass

    def file_served(self, served: FileServed) -> None:
        pass


@dataclass
class Trace:
    transfers: list[Transfer] = field(default_factory=list)
    stages: list[StageTiming] = field(default_factory=list)
    files: list[FileServed] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (t, uevent action) on our port
    listener: Listener = field(default_factory=Listener, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    t0: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.t0 = self.clock()

    def now(self) -> float:
        return self.clock() - self.t0

    def begin(self, name: str, attempt: int = 1) -> StageTiming:
        stage = StageTiming(name, self.now(), attempt=attempt)
        self.stages.append(stage)
        self.listener.stage_started(stage)
        return stage

    def end(self, stage: StageTiming, ok: bool, detail: str = "") -> None:
        stage.duration = self.now() - stage.start
        stage.ok = ok
        stage.detail = detail or stage.detail
        self.listener.stage_ended(stage)

    def transfer(self, transfer: Transfer) -> None:
        self.transfers.append(transfer)

    def file(self, served: FileServed) -> None:
        self.files.append(served)
        self.listener.file_served(served)

    def event(self, action: str) -> None:
        self.events.append((self.now(), action))

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [asdict(s) for s in self.stages],
            "transfers": [asdict(t) for t in self.transfers],
            "files": [asdict(f) for f in self.files],
            "events": [{"t": t, "action": a} for t, a in self.events],
        }
