"""Running this framework's own commands on the controller that holds a rig, and getting files there and back.

A controller on this host is a child process. Any other is reached with OpenSSH (``ssh``/``scp``, batch mode: a
key, never a password prompt), running the controller's own interpreter in its own checkout, as ``hil lab
serve`` published them in the rig's exporter resource. An image travels once per controller: it is stored in the
controller's cache under its SHA-256, and a copy already there is used as is.
"""

from __future__ import annotations

import hashlib
import shlex
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hil.errors import InfrastructureError, InputError
from hil.lab.coordinator import STAGE, PlaceView

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
COPY_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Controller:
    name: str
    host: str  # how other machines reach it (ssh); this host's name when it is this host
    python: str  # its interpreter, with cm-hil installed
    workdir: str  # its cm-hil checkout
    reports: str  # where its reports go, and its image cache

    @classmethod
    def of(cls, view: PlaceView) -> Controller:
        p = view.rig
        missing = [k for k in ("controller", "host", "python", "workdir", "reports") if not p.get(k)]
        if missing:
            raise InfrastructureError(f"place {view.name}'s rig resource lacks {', '.join(missing)}. Fix: restart "
                                      "its controller's `hil lab serve` with this version", stage=STAGE)
        return cls(str(p["controller"]), str(p["host"]), str(p["python"]), str(p["workdir"]), str(p["reports"]))

    @property
    def cache(self) -> str:
        return f"{self.reports}/lab-images"

    @property
    def is_here(self) -> bool:
        return self.host in (socket.gethostname(), "localhost", "127.0.0.1", "::1")

    def hil(self, *args: str, env: Mapping[str, str] | None = None) -> list[str]:
        """argv that runs ``hil ARGS`` on the controller, with ``env`` set there (a child here inherits the
        rest of this process's environment; ssh passes none of it)."""
        command = [self.python, "-m", "hil.cli", *args]
        if self.is_here:
            return command
        settings = [f"{k}={v}" for k, v in (env or {}).items()]
        return self._ssh(f"cd {shlex.quote(self.workdir)} && {shlex.join(['env', *settings, *command])}")

    def _ssh(self, remote: str) -> list[str]:
        return ["ssh", *SSH_OPTIONS, self.host, "--", remote]

    def _check(self, argv: list[str], what: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=COPY_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise InfrastructureError(f"{argv[0]} is not installed. Fix: apt install openssh-client",
                                      stage=STAGE) from None
        except subprocess.TimeoutExpired:
            raise InfrastructureError(f"{what} on controller {self.name} ({self.host}) took over "
                                      f"{COPY_TIMEOUT_S:g} s", stage=STAGE) from None
        if done.returncode not in ok:
            raise InfrastructureError(f"{what} on controller {self.name} ({self.host}) failed: "
                                      f"{done.stderr.strip()[-300:]}. Fix: check that this host can ssh to "
                                      f"{self.host} with a key (BatchMode)", stage=STAGE, controller=self.name)
        return done

    def put_image(self, image: Path) -> str:
        """The image's path on the controller, copied there at most once (kept under its SHA-256)."""
        if not image.is_file():
            raise InputError(f"{image}: no such image. Fix: give the path of an image file", stage=STAGE)
        if self.is_here:
            return str(image.resolve())
        remote = f"{self.cache}/{sha256(image)}-{image.name}"
        quoted = shlex.quote(remote)
        if self._check(self._ssh(f"test -f {quoted}"), "looking for the cached image", ok=(0, 1)).returncode == 0:
            return remote
        self._check(self._ssh(f"mkdir -p {shlex.quote(self.cache)}"), "making the image cache")
        self._check(["scp", *SSH_OPTIONS, "-q", str(image), f"{self.host}:{remote}.part"], "copying the image")
        self._check(self._ssh(f"mv {quoted}.part {quoted}"), "storing the image")
        return remote

    def fetch(self, remote: str, local: Path) -> None:
        """Copy the folder ``remote`` of the controller to ``local`` (nothing to do on this host)."""
        if self.is_here:
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        self._check(["scp", *SSH_OPTIONS, "-q", "-r", f"{self.host}:{remote}", str(local)], "fetching results")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
