"""One rig session: the one place that loads a rig, owns it and hands its lifecycle to a command, the pytest
plugin or a benchmark.

Opening a session loads the rig file (bad input fails here, before anything is touched), takes the rig's lock
(a second user is refused at once with the holder named), brings up the rig's *body* when the rig file brings
one, then opens the :class:`~hil.control.lifecycle.Lifecycle`, which writes the state file and leaves the rig
safe on any exit. Closing undoes it all in reverse order, so the safe state reaches a body that still exists.

A body is hardware that a rig file describes itself rather than cables: the virtual rig. The library finds
bodies through the ``cm_hil.rig_bodies`` entry point group and never imports them; a body is an object with
the methods of :class:`RigBody`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from hil.control.lifecycle import Lifecycle
from hil.errors import InfrastructureError
from hil.lab.locks import rig_lock
from hil.rig import Rig, load_rig

BODY_GROUP = "cm_hil.rig_bodies"
PayloadPurpose = Literal["mass-storage", "recovery"]


class RigBody(Protocol):
    """What a ``cm_hil.rig_bodies`` entry point names (an object, or a class called without arguments)."""

    def claims(self, rig: Rig) -> bool:
        """True when this body makes the hardware of ``rig`` (the virtual body: a rig with ``[virtual]``)."""

    def prepare(self, rig: Rig, rerun: Sequence[str] | None) -> None:
        """Make this process able to reach the body, before the lock is taken. ``rerun``: the command's
        arguments, for a body that re-runs the command in the environment it needs (None: it may not)."""

    def rerun_elsewhere(self, rig: Rig, argv: Sequence[str], transport: str | None) -> int | None:
        """Run the whole command (``python ARGV...``) where the body is reached from and return its exit code;
        None: it runs here. ``transport``: one the command line asked for, over the rig file's."""

    def bring_up(self, rig: Rig) -> AbstractContextManager[Any]:
        """The body, live for the ``with`` block; what it yields is :attr:`RigSession.body`."""

    def stand_in_payload(self, rig: Rig, folder: Path, purpose: PayloadPurpose) -> Path | None:
        """A usbboot payload folder made in ``folder`` for a rig file that names none (None: cannot)."""


def find_body(rig: Rig) -> RigBody | None:
    """The installed body that claims ``rig``; a rig with a [virtual] section that none claims is an install
    problem, named as such."""
    for entry in entry_points(group=BODY_GROUP):
        found = entry.load()
        body: RigBody = found() if isinstance(found, type) else found
        if body.claims(rig):
            return body
    if rig.virtual is not None:
        raise InfrastructureError(f"{rig.path} describes a virtual rig, but no installed rig body ({BODY_GROUP} "
                                  "entry point) brings it up. Fix: reinstall the project (pip install -e .)",
                                  stage="session")
    return None


class RigSession:
    """One rig, owned for a ``with`` block: lock, body, lifecycle. Use ``session.lifecycle`` to drive it.

    ``rerun``: this command's arguments, so that a body may re-run it where it must (the virtual rig under
    umockdev-wrapper, for USB); None where the process cannot be replaced (pytest). That re-run happens here,
    when the session is made, so a command makes its session before it prints anything. ``switches=False``: the
    rig's power and boot-mode switches are left as they are (no lifecycle; ``hil flash --no-usbboot`` on a module
    that something else put in mass storage), the lock and the body still held."""

    def __init__(self, rig: Rig | str | Path, *, rerun: Sequence[str] | None = None, log_dir: Path | None = None,
                 lock_wait: float = 0.0, handle_signals: bool = True, report_recovery: bool = True,
                 switches: bool = True):
        self.rig = rig if isinstance(rig, Rig) else load_rig(rig)
        self.log_dir = log_dir
        self.lock_wait = lock_wait
        self.handle_signals = handle_signals
        self.report_recovery = report_recovery
        self.switches = switches
        self.body: Any = None  # what the rig's body yielded (a virtual rig), or None for hardware
        if rerun is not None:  # a busy rig is refused at once, not after a body's imports and re-run
            probe = rig_lock(self.rig)
            probe.acquire(lock_wait)
            probe.release()
        self._body_kind = find_body(self.rig)
        if self._body_kind is not None and rerun is not None:
            self._body_kind.prepare(self.rig, rerun)  # may re-run this command: nothing is held yet
        self._lifecycle: Lifecycle | None = None
        self._stack = contextlib.ExitStack()
        self._work: Path | None = None

    def open(self) -> RigSession:
        # the rig file picks the lock; before the body: a second user must not touch its console or eMMC
        lock = rig_lock(self.rig)
        lock.acquire(self.lock_wait)
        try:
            self._stack.callback(lock.release)
            if self._body_kind is not None:
                self.body = self._stack.enter_context(self._body_kind.bring_up(self.rig))
            if self.switches:
                self._lifecycle = self._stack.enter_context(
                    Lifecycle(self.rig, lock=lock, log_dir=self.log_dir, handle_signals=self.handle_signals))
        except BaseException:
            self.close()
            raise
        if self._lifecycle is not None and self._lifecycle.recovered and self.report_recovery:
            print(f"hil: {self._lifecycle.recovered}", file=sys.stderr)
        return self

    def close(self) -> None:
        self.__exit__(None, None, None)

    def __enter__(self) -> RigSession:
        return self.open()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        """Lifecycle first (the rig left safe, while its body still exists), then the body, then the lock; an
        error on the way is noted on the one that ended the block rather than hiding it."""
        self._lifecycle = None
        try:
            self._stack.__exit__(t, e, tb)
        finally:
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)
                self._work = None

    @property
    def lifecycle(self) -> Lifecycle:
        if self._lifecycle is None:
            raise InfrastructureError("the rig session is not open (or leaves the rig's switches alone); use it as "
                                      "a context manager", stage="session")
        return self._lifecycle

    def payload(self, given: Path | None = None, purpose: PayloadPurpose = "mass-storage",
                work: Path | None = None) -> Path | None:
        """The usbboot payload folder: ``given``, else the rig file's (its ``[usb] payload`` is the mass-storage
        one), else a stand-in from the rig's body (made in ``work``, or in a private folder removed when the
        session ends); None when there is none."""
        folder = given or (self.rig.payload if purpose == "mass-storage" else None)
        if folder is not None or self._body_kind is None:
            return folder
        if work is None:
            if self._work is None:
                self._work = Path(tempfile.mkdtemp(prefix=f"cm-hil-{self.rig.name}-"))  # 0700, ours
            work = self._work
        return self._body_kind.stand_in_payload(self.rig, work, purpose)

