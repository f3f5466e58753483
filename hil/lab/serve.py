"""``hil lab serve``: one controller's labgrid exporter, serving its rigs, with their places declared.

The exporter is labgrid's own (``labgrid-exporter``), run as a child with the configuration generated from
the rig files in a private folder; this process declares the places (tags, match) on the coordinator, then
waits for the exporter and passes SIGINT/SIGTERM on, so stopping ``hil lab serve`` stops the exporter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import yaml

from hil.errors import InputError
from hil.lab.coordinator import STAGE, Coordinator, Holder, coordinator_address
from hil.lab.exporter import exporter_config, places
from hil.rig import Rig


def lab_coordinator(rigs: Sequence[Rig], given: str | None, allow_remote: bool) -> tuple[str, bool]:
    """The coordinator address: the one given, else the one all rig files name (they must agree)."""
    if given:
        return coordinator_address(given, allow_remote=allow_remote), allow_remote
    named = {r.lab.coordinator for r in rigs}
    if len(named) > 1:
        raise InputError(f"the rig files name different coordinators ({', '.join(sorted(named))}). Fix: give "
                         "--coordinator, or one coordinator in every rig file's [lab]", stage=STAGE)
    allow = allow_remote or all(r.lab.allow_remote_coordinator for r in rigs)
    address = named.pop() if named else "127.0.0.1:20408"
    return coordinator_address(address, allow_remote=allow), allow


def write_config(rigs: Sequence[Rig], folder: Path, *, controller: str, site: str, host: str = "") -> Path:
    """The exporter configuration as a 0600 file in ``folder`` (a private folder this process made)."""
    path = folder / "exporter.yaml"
    text = yaml.safe_dump(exporter_config(rigs, controller=controller, site=site, host=host), sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def declare_places(rigs: Sequence[Rig], address: str, *, controller: str, site: str, allow_remote: bool) -> None:
    with Coordinator(address, holder=Holder.this_process(f"exporter-{controller}"),
                     allow_remote=allow_remote) as lab:
        for name, spec in places(rigs, controller=controller, site=site).items():
            lab.define_place(name, tags=spec["tags"], match=spec["match"], comment=spec["comment"])


def serve(rigs: Sequence[Rig], address: str, *, controller: str, site: str, allow_remote: bool,
          config_out: Path | None = None, host: str = "") -> int:
    """Declare the places, then run labgrid's exporter until it ends or this process is told to stop."""
    folder = Path(tempfile.mkdtemp(prefix=f"cm-hil-exporter-{controller}-"))  # 0700, ours
    try:
        config = write_config(rigs, folder, controller=controller, site=site, host=host)
        if config_out is not None:
            shutil.copyfile(config, config_out)
        declare_places(rigs, address, controller=controller, site=site, allow_remote=allow_remote)
        command = [sys.executable, "-m", "labgrid.remote.exporter", "-c", address, "-n", controller,
                   "--hostname", host or socket.gethostname(), str(config)]
        child = subprocess.Popen(command)
        print(f"hil lab: exporter {controller} (pid {child.pid}) serves {', '.join(r.name for r in rigs)} "
              f"to {address}", flush=True)

        def forward(signum: int, frame: FrameType | None) -> None:
            child.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            return child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
