"""Running the host's image tools (mtools, debugfs, mkfs, compressors) from inside a test session.

Tests run under ``umockdev-wrapper``: a child that inherits its LD_PRELOAD (or UMOCKDEV_DIR) would
route its own device access through the mock, so every tool gets a clean environment.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hil.errors import InfrastructureError
from hil.hostenv import outside_umockdev


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for a tool: ours without the umockdev hooks, C locale for stable messages."""
    env = outside_umockdev()
    env.update(LC_ALL="C", MTOOLS_SKIP_CHECK="1", DEBUGFS_PAGER="__none__", **extra)
    return env


def need(tool: str, package: str) -> str:
    """The full path of ``tool``; a missing tool is the host's problem and says which package to install."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not found:
        raise InfrastructureError(f"{tool} not found on this host. Fix: apt-get install {package}",
                                  stage="image.tools", tool=tool)
    return found


def run(argv: Sequence[str | Path], *, package: str, input: bytes | None = None,
        check: bool = True, stage: str = "image.tools") -> subprocess.CompletedProcess[bytes]:
    """Run a tool, capturing output. ``check`` turns a non-zero exit into an InfrastructureError."""
    cmd = [need(str(argv[0]), package), *map(str, argv[1:])]
    proc = subprocess.run(cmd, input=input, capture_output=True, env=tool_env(),
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode:
        raise InfrastructureError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): {errors(proc)}",
                                  stage=stage, argv=cmd)
    return proc


def errors(proc: subprocess.CompletedProcess[bytes]) -> str:
    """A tool's stderr as one line, for a message."""
    lines = proc.stderr.decode(errors="replace").splitlines()
    return " / ".join(line.strip() for line in lines if line.strip())
