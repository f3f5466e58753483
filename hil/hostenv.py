"""Whether this process runs under umockdev, and the environment for a child that must not.

Under ``umockdev-wrapper`` a process's ``/sys`` and some ``/dev`` paths are redirected into the testbed; a child
that inherits LD_PRELOAD (or UMOCKDEV_DIR) would route its own device access through the mock too, so host tools
(losetup, mtools, lsblk) and processes that make a testbed of their own (the nightly's pytest) start without them.
"""

from __future__ import annotations

import os

_UMOCKDEV_VARS = ("LD_PRELOAD", "UMOCKDEV_DIR")


def umockdev_active() -> bool:
    """True when libusb and udev calls of this process reach umockdev (not the host's real devices)."""
    return "libumockdev-preload" in os.environ.get("LD_PRELOAD", "")


def outside_umockdev() -> dict[str, str]:
    """This process's environment without umockdev's hooks."""
    return {k: v for k, v in os.environ.items() if k not in _UMOCKDEV_VARS}
