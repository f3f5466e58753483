"""The rig lock, with two backends behind one small interface; the rig file's ``[lab] lock`` says which.

``local``: an exclusive ``flock`` on this controller (:class:`hil.control.lifecycle.RigLock`); the kernel drops
it when its holder dies. ``labgrid``: the rig's place on the lab's coordinator, acquired in the name of the CI job
and process (:class:`hil.lab.coordinator.Holder`), *and* the local flock, so that the lab and this controller
agree. labgrid keeps a place acquired when its holder dies, so a place held by a process of this host that no
longer exists is released (and said so); one held elsewhere is reported with its holder.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from hil.control.lifecycle import RigLock
from hil.errors import InfrastructureError
from hil.lab.coordinator import STAGE, Coordinator, Holder
from hil.rig import Rig

log = logging.getLogger(__name__)
POLL_S = 0.2


class RigLockBackend(Protocol):
    """What a rig's owner needs of its lock. ``acquire`` refuses (InfrastructureError naming the holder) after
    ``wait`` seconds; ``release`` never raises for a lock it does not hold."""

    def acquire(self, wait: float = 0.0) -> None: ...

    def holder(self) -> str | None:
        """Who holds the rig now, as the backend names it; None when it is free."""

    def release(self) -> None: ...


def rig_lock(rig: Rig) -> RigLockBackend:
    """The lock the rig file asks for."""
    return PlaceLock(rig) if rig.lab.lock == "labgrid" else RigLock(rig)


class PlaceLock:
    """The rig's labgrid place (lab-wide) and its local flock (this controller), taken in that order."""

    def __init__(self, rig: Rig, *, holder: Holder | None = None, timeout: float = 10.0):
        self.rig = rig
        self.place = rig.lab.place or rig.name
        self.identity = holder or Holder.this_process()
        self.timeout = timeout
        self.local = RigLock(rig)
        self.recovered: str | None = None  # a dead holder's place we released on the way in
        self._held = False  # we acquired the place (and must release it)
        self._borrowed = False  # our job already holds the place (hil lab reserve): use it, leave it held

    def _connect(self) -> Coordinator:
        return Coordinator(self.rig.lab.coordinator, holder=self.identity, timeout=self.timeout,
                           allow_remote=self.rig.lab.allow_remote_coordinator)

    def acquire(self, wait: float = 0.0) -> None:
        if self._held or self._borrowed:
            return
        deadline = time.monotonic() + wait
        job_holder = str(Holder(self.identity.host, self.identity.job))
        with self._connect() as lab:
            while True:
                view = lab.place(self.place)
                if view.acquired == job_holder:
                    self._borrowed = True
                    break
                if view.acquired is None:
                    try:
                        lab.acquire(self.place)
                        self._held = True
                        break
                    except InfrastructureError:
                        if time.monotonic() >= deadline:  # reserved for another job, or a resource is held
                            raise
                elif view.holder is not None and view.holder.is_dead_here():
                    lab.release(self.place, holder=view.acquired)
                    self.recovered = (f"place {self.place} was held by {view.acquired}, a process of this host "
                                      "that no longer runs (killed?): released")
                    log.warning("%s", self.recovered)
                    continue
                elif time.monotonic() >= deadline:
                    raise InfrastructureError(
                        f"rig {self.rig.name} (labgrid place {self.place}) is in use by {view.acquired}. Fix: wait "
                        f"for that job to finish; if it is gone, release the place: hil lab release {self.place} "
                        "--kick", stage=f"{STAGE}.lock", place=self.place, holder=view.acquired)
                time.sleep(POLL_S)
        try:
            self.local.acquire(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self._release_place()
            raise

    def holder(self) -> str | None:
        """Who holds the place (labgrid's ``HOST/USER``), else the local lock; None when both are free."""
        with self._connect() as lab:
            held = lab.place(self.place).acquired
        return f"{held} (labgrid place {self.place})" if held else self.local.holder()

    def release(self) -> None:
        try:
            self.local.release()
        finally:
            self._release_place()

    def _release_place(self) -> None:
        held, self._held, self._borrowed = self._held, False, False
        if not held:
            return
        try:
            with self._connect() as lab:
                lab.release(self.place, holder=str(self.identity))
        except InfrastructureError as e:  # the next acquire on this host releases it once we are gone
            log.warning("could not release labgrid place %s: %s", self.place, e)
