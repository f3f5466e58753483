"""Run ``python -m MODULE ARGS...`` with every Python thread's name handed to the kernel (``prctl(PR_SET_NAME)``).

Python 3.11 leaves all of a process's threads called ``python`` in ``/proc``; bench/many_rigs.py needs the names
(``virtual-*``, ``console-*``, ``flash-*``) to tell the virtual rig's CPU from the framework's. Usage:
``python bench/threadnames.py hil.cli flash IMAGE --rig RIG`` (already under umockdev-wrapper, so that hil does not
re-run itself without this).
"""

from __future__ import annotations

import ctypes
import runpy
import sys
import threading
from typing import Any

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)
_bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _named_bootstrap(self: threading.Thread, *args: Any) -> None:
    _libc.prctl(PR_SET_NAME, self.name.encode()[:15], 0, 0, 0)  # the kernel keeps 15 bytes
    _bootstrap(self, *args)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    threading.Thread._bootstrap_inner = _named_bootstrap  # type: ignore[attr-defined]
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
