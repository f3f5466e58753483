"""A loopback lab: labgrid's coordinator and this project's exporters (``hil lab serve``), all on 127.0.0.1.

Every process is started in its own session and killed by its process group at the end, whatever the test did;
every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hilrun import hil_command
from tests.rigfiles import virtual_rig_toml

pytest.importorskip("labgrid", reason="the lab needs labgrid: pip install -e '.[lab]' (setup.sh does)")

START_S = 30.0  # a loaded 2-core machine starts a coordinator in about 3 s


class Processes:
    """Children in their own process groups, killed together."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              log: Path | None = None) -> subprocess.Popen[str]:
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the child
        child = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        self.children.append(child)
        return child

    def kill(self, child: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(10)

    def close(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                self.kill(child, signal.SIGTERM)


def wait_for(what: str, check: Callable[[], object], timeout: float = START_S) -> object:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


@pytest.fixture
def processes() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def coordinator(processes: Processes, tmp_path: Path) -> str:
    """A labgrid coordinator on 127.0.0.1 (a free port), its state in a folder of this test."""
    folder = tmp_path / "coordinator"
    folder.mkdir()
    log = folder / "log"
    child = processes.start([sys.executable, "-m", "labgrid.remote.coordinator", "-l", "127.0.0.1:0"],
                            cwd=folder, log=log)

    def listening() -> str | None:
        assert child.poll() is None, f"the coordinator exited: {log.read_text()}"
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", log.read_text())
        return m.group(1) if m else None

    return str(wait_for("the coordinator listening", listening))


@pytest.fixture
def lab_rig(tmp_path: Path, coordinator: str) -> Callable[..., Path]:
    """lab_rig(name, port, tags=None) -> a virtual rig file whose lock is the lab's place."""

    def make(name: str, port: str, *, tags: dict[str, str] | None = None, model: str = "cm4",
             emmc: str = "64MiB", extra: dict[str, Any] | None = None) -> Path:
        lab = {"lock": "labgrid", "coordinator": coordinator, **({"tags": tags} if tags else {})}
        path = tmp_path / f"{name}.toml"
        path.write_text(virtual_rig_toml(name, model, port, state_dir=tmp_path / "state" / name, emmc=emmc,
                                         extra={**(extra or {}), "lab": lab}))
        return path

    return make


@pytest.fixture
def serve(processes: Processes, coordinator: str, tmp_path: Path) -> Callable[..., subprocess.Popen[str]]:
    """serve(controller, rig files, site="", host="") -> ``hil lab serve`` running, its places online; its
    reports (and image cache) under the test's folder."""
    from hil.lab.coordinator import Coordinator

    def start(controller: str, rigs: list[Path], site: str = "", host: str = "") -> subprocess.Popen[str]:
        argv, env = hil_command("lab", "serve", "--controller", controller, "--coordinator", coordinator,
                                *(["--site", site] if site else []), *(["--host", host] if host else []),
                                "--rig", *map(str, rigs))
        env["HIL_REPORTS_DIR"] = str(tmp_path / f"reports-{controller}")
        log = tmp_path / f"exporter-{controller}.log"
        child = processes.start(argv, env=env, log=log)
        names = {p.stem for p in rigs}

        def online() -> bool:
            assert child.poll() is None, f"hil lab serve exited: {log.read_text()}"
            with Coordinator(coordinator) as lab:
                views = lab.places()
            return all(n in views and views[n].available for n in names)

        wait_for(f"exporter {controller} online", online)
        return child

    return start
