"""A bounded, synchronous client of a labgrid coordinator: places, their holders, acquire, release, reserve.

labgrid's own :class:`~labgrid.remote.client.ClientSession` speaks the protocol; this wrapper gives it a private
event loop, a deadline on every call, errors with a stage and a class, and an identity (the *holder*) named after
the CI job and the process, so that a stuck place can be traced to the job that left it and, on the same host,
to a process that no longer exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hil.errors import InfrastructureError, InputError

STAGE = "lab"
DEFAULT_PORT = 20408
RIG_RESOURCE = "CmHilRig"  # the exporter resource that stands for one rig (see hil.lab.exporter)
_T = TypeVar("_T")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:#+-]+")
#: Where CI systems name the job that runs us, most specific first (GitLab, GitHub, Jenkins, Buildkite).
_JOB_VARIABLES = (("HIL_HOLDER",), ("CI_JOB_NAME", "CI_JOB_ID"), ("GITHUB_WORKFLOW", "GITHUB_RUN_ID"),
                  ("JOB_NAME", "BUILD_NUMBER"), ("BUILDKITE_PIPELINE_SLUG", "BUILDKITE_BUILD_NUMBER"))


def coordinator_address(address: str, *, allow_remote: bool) -> str:
    """``HOST[:PORT]`` with the port filled in. labgrid's gRPC has no authentication, so a host that is not a
    loopback address is refused (exit 2, before anything is touched) unless ``allow_remote`` says the network in
    between is trusted (a management network, or an SSH tunnel ending on this host)."""
    normal, problem, fix = check_address(address, allow_remote=allow_remote)
    if problem:
        raise InputError(f"{problem}. Fix: {fix}", stage=STAGE, coordinator=address)
    return normal


def check_address(address: str, *, allow_remote: bool) -> tuple[str, str, str]:
    """(``HOST:PORT``, "", "") for a usable coordinator address, else ("", the problem, the fix)."""
    m = re.fullmatch(r"\[(?P<v6>[0-9a-fA-F:]+)\](?::(?P<p6>\d+))?|(?P<host>[^:\s\[\]]+)(?::(?P<port>\d+))?",
                     address.strip())
    if not m:
        return "", f"coordinator address {address!r} is not HOST[:PORT]", f"write e.g. 127.0.0.1:{DEFAULT_PORT}"
    host = m.group("v6") or m.group("host")
    port = int(m.group("p6") or m.group("port") or DEFAULT_PORT)
    if not 0 < port < 65536:
        return "", f"coordinator port {port} is out of range", "use a port from 1 to 65535"
    if not allow_remote and not _is_loopback(host):
        return "", (f"coordinator {host} is not on this host's loopback, and labgrid's gRPC has no "
                    "authentication"), ("reach it through an SSH tunnel to 127.0.0.1 (ssh -L 20408:localhost:20408 "
                                        "HOST), or allow it (rig file [lab] allow_remote_coordinator = true, or "
                                        "--allow-remote-coordinator) when the network in between is a trusted "
                                        "management network")
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), "", ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it resolves wherever DNS says, so it is not trusted as loopback


@dataclass(frozen=True)
class Holder:
    """Who holds a place, as labgrid records it: ``HOST/USER``. Ours write USER as ``JOB@PID``."""

    host: str
    job: str
    pid: int | None = None

    @classmethod
    def this_process(cls, job: str | None = None) -> Holder:
        return cls(os.environ.get("LG_HOSTNAME") or socket.gethostname(), _safe(job or ci_job()), os.getpid())

    @classmethod
    def parse(cls, acquired: str) -> Holder:
        host, _, user = acquired.partition("/")
        job, at, pid = user.rpartition("@")
        if at and pid.isdigit():
            return cls(host, job, int(pid))
        return cls(host, user, None)

    @property
    def user(self) -> str:
        return self.job if self.pid is None else f"{self.job}@{self.pid}"

    def __str__(self) -> str:
        return f"{self.host}/{self.user}"

    def is_dead_here(self) -> bool:
        """True when this holder was a process on this host that no longer runs (killed, crashed)."""
        if self.pid is None or self.host != (os.environ.get("LG_HOSTNAME") or socket.gethostname()):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def ci_job() -> str:
    """The CI job running us (so a stuck place names it), else the login user."""
    for names in _JOB_VARIABLES:
        values = [os.environ.get(n, "") for n in names]
        if all(values):
            return "#".join(values)
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER") or f"uid{os.getuid()}"


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")[:80] or "job"


@dataclass(frozen=True)
class PlaceView:
    """One place as the coordinator shows it, with the rig its match points at (if the exporter has it)."""

    name: str
    tags: Mapping[str, str]
    acquired: str | None
    comment: str = ""
    reservation: str | None = None
    rig: Mapping[str, Any] = field(default_factory=dict)  # the CmHilRig resource's params
    exporter: str | None = None
    available: bool = False

    @property
    def holder(self) -> Holder | None:
        return Holder.parse(self.acquired) if self.acquired else None

    def matches(self, tags: Mapping[str, str]) -> bool:
        return all(self.tags.get(k) == v for k, v in tags.items())


_threads = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for coordinator calls, kept for the thread's life: grpc.aio binds its channels
    and its completion-queue poller to the loop current when they are made, and errs on a closed one."""
    loop = getattr(_threads, "loop", None)
    if loop is None:
        loop = _threads.loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


class Coordinator:
    """A connection to one coordinator, as ``holder``. Use as a context manager; every call has a deadline."""

    def __init__(self, address: str, *, holder: Holder | None = None, allow_remote: bool = False,
                 timeout: float = 10.0):
        self.address = coordinator_address(address, allow_remote=allow_remote)
        self.holder = holder or Holder.this_process()
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: Any = None

    # -- connection ------------------------------------------------------------------------------

    def open(self) -> Coordinator:
        try:
            from labgrid.remote.client import ClientSession
        except ImportError:
            raise InfrastructureError("labgrid is not installed. Fix: pip install -e '.[lab]' (or run ./setup.sh)",
                                      stage=STAGE) from None
        holder = self.holder

        class _Session(ClientSession):
            def gethostname(self) -> str:
                return holder.host

            def getuser(self) -> str:
                return holder.user

        self._loop = _thread_loop()
        try:
            self._session = _Session(self.address, self._loop)
            self._run(self._session.start(), what="connect")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        loop, session, self._loop, self._session = self._loop, self._session, None, None
        if loop is None or session is None:
            return
        for step in (session.stop(), session.close()):
            with contextlib.suppress(Exception):  # a coordinator that went away is already closed
                loop.run_until_complete(asyncio.wait_for(step, 5.0))

    def __enter__(self) -> Coordinator:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T], *, what: str) -> _T:
        assert self._loop is not None, "the coordinator connection is not open"
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))
        except TimeoutError:
            raise InfrastructureError(f"the labgrid coordinator at {self.address} did not answer ({what}) within "
                                      f"{self.timeout:g} s. Fix: check that labgrid-coordinator runs there",
                                      stage=STAGE, coordinator=self.address) from None
        except Exception as e:
            if type(e).__name__ in ("ServerError", "UserError", "AioRpcError", "Error"):
                detail = e.details() if hasattr(e, "details") else str(e)
                raise InfrastructureError(f"labgrid coordinator at {self.address}: {what} failed: {detail}. Fix: "
                                          "check that labgrid-coordinator runs there (same labgrid version)",
                                          stage=STAGE, coordinator=self.address) from None
            raise

    async def _call(self, method: str, request: Any) -> Any:
        response = await getattr(self._session.stub, method)(request)
        await self._session.sync_with_coordinator()
        return response

    def _pb(self) -> Any:
        from labgrid.remote.generated import labgrid_coordinator_pb2
        return labgrid_coordinator_pb2

    # -- places ----------------------------------------------------------------------------------

    def places(self) -> dict[str, PlaceView]:
        self._run(self._session.sync_with_coordinator(), what="list places")
        resources = self._session.resources
        views = {}
        for name, place in self._session.places.items():
            rig: Mapping[str, Any] = {}
            exporter = None
            available = False
            for exp, groups in resources.items():
                for group_name, group in groups.items():
                    for resource_name, entry in group.items():
                        if entry.cls == RIG_RESOURCE and place.getmatch((exp, group_name, entry.cls, resource_name)):
                            rig, exporter, available = dict(entry.params), exp, bool(entry.avail)
            views[name] = PlaceView(name, dict(place.tags), place.acquired, place.comment, place.reservation,
                                    rig, exporter, available)
        return views

    def place(self, name: str) -> PlaceView:
        view = self.places().get(name)
        if view is None:
            raise InputError(f"the labgrid coordinator at {self.address} has no place {name!r}. Fix: start the "
                             "controller's exporter with `hil lab serve`, which creates its places", stage=STAGE,
                             place=name)
        return view

    def define_place(self, name: str, *, tags: Mapping[str, str], match: str, comment: str = "") -> None:
        """Create ``name`` (if new) with exactly one match and these tags: what ``hil lab serve`` declares."""
        pb = self._pb()
        current = self._session.places.get(name)
        if current is None:
            self._run(self._call("AddPlace", pb.AddPlaceRequest(name=name)), what=f"add place {name}")
            current = self._session.places[name]
        if match not in [repr(m) for m in current.matches]:
            if current.acquired:
                raise InfrastructureError(f"place {name} is held by {current.acquired} and its match must change "
                                          f"to {match}. Fix: release it first (hil lab release {name})",
                                          stage=STAGE, place=name)
            for old in list(current.matches):
                self._run(self._call("DeletePlaceMatch", pb.DeletePlaceMatchRequest(placename=name,
                                                                                    pattern=repr(old))),
                          what=f"clear the matches of {name}")
            self._run(self._call("AddPlaceMatch", pb.AddPlaceMatchRequest(placename=name, pattern=match)),
                      what=f"match {name} to {match}")
        if dict(current.tags) != dict(tags):
            self._run(self._call("SetPlaceTags", pb.SetPlaceTagsRequest(placename=name, tags=dict(tags))),
                      what=f"tag {name}")
        if comment and current.comment != comment:
            self._run(self._call("SetPlaceComment", pb.SetPlaceCommentRequest(placename=name, comment=comment)),
                      what=f"comment {name}")

    def acquire(self, name: str) -> None:
        pb = self._pb()
        self._run(self._call("AcquirePlace", pb.AcquirePlaceRequest(placename=name)), what=f"acquire {name}")

    def release(self, name: str, *, holder: str | None = None) -> None:
        """Release ``name``; with ``holder``, only if that holder still has it (never someone else's)."""
        pb = self._pb()
        request = (pb.ReleasePlaceRequest(placename=name, fromuser=holder) if holder
                   else pb.ReleasePlaceRequest(placename=name))
        self._run(self._call("ReleasePlace", request), what=f"release {name}")

    # -- reservations ----------------------------------------------------------------------------

    def reserve(self, tags: Mapping[str, str], *, wait: float, prio: float = 0.0) -> tuple[str, list[str]]:
        """Reserve one place whose tags match: (token, allocated place names). Waits up to ``wait`` seconds,
        refreshing the reservation, then cancels it and refuses naming who holds the matching places."""
        pb = self._pb()
        request = pb.CreateReservationRequest(filters={"main": pb.Reservation.Filter(filter=dict(tags))},
                                              prio=prio)
        token = self._run(self._session.stub.CreateReservation(request), what="reserve").reservation.token
        deadline = time.monotonic() + wait
        while True:
            res = self._run(self._session.stub.PollReservation(pb.PollReservationRequest(token=token)),
                            what="poll the reservation").reservation
            allocated = [name for name in res.allocations.values() if name]
            if allocated:
                return token, allocated
            if res.state not in (0,) or time.monotonic() >= deadline:  # 0: waiting
                self.cancel(token)
                matching = [p for p in self.places().values() if p.matches(tags)]
                held = ", ".join(f"{p.name} by {p.acquired}" for p in matching if p.acquired) or "none held"
                if not matching:
                    raise InputError(f"no place matches {_tags(tags)}. Fix: check the tags (hil lab list)",
                                     stage=STAGE)
                raise InfrastructureError(f"no place matching {_tags(tags)} came free within {wait:g} s ({held}). "
                                          "Fix: wait longer (--wait), or release a place (hil lab release)",
                                          stage=STAGE)
            time.sleep(0.2)

    def cancel(self, token: str) -> None:
        pb = self._pb()
        self._run(self._session.stub.CancelReservation(pb.CancelReservationRequest(token=token)),
                  what="cancel the reservation")


def _tags(tags: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in tags.items()) or "(any)"
