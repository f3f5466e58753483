"""The ``hil`` command as a user starts it, for tests: a new process that puts itself under umockdev-wrapper."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from hil.hostenv import outside_umockdev


def hil_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment for ``hil ARGS...`` (this process's umockdev hooks left out: hil adds its own)."""
    return [sys.executable, "-m", "hil.cli", *args], outside_umockdev()


def hil(*args: str, timeout: float = 120, **options: Any) -> subprocess.CompletedProcess[str]:
    """``options`` go to subprocess.run (``cwd``, ``stdin``)."""
    argv, env = hil_command(*args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False, **options)
