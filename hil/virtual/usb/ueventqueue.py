"""Whether this host gives umockdev's uevent listeners enough room (``net.unix.max_dgram_qlen``)."""

from __future__ import annotations

UEVENT_QUEUE = 4096  # datagrams a uevent listener may fall behind; setup.sh sets it
_QLEN_FILE = "/proc/sys/net/unix/max_dgram_qlen"


def uevent_queue_shortfall(qlen_file: str = _QLEN_FILE) -> str | None:
    """Why this host may abort the virtual rig, or None.

    umockdev 0.17.16 sends each uevent to every listener's socket without waiting and aborts the process
    on EAGAIN; a listener's queue holds ``net.unix.max_dgram_qlen`` datagrams (10 by default), fewer than
    one mass-storage plug sends to a listener that is busy for a moment."""
    try:
        with open(qlen_file) as f:
            qlen = int(f.read())
    except (OSError, ValueError):
        return None
    if qlen >= UEVENT_QUEUE:
        return None
    return (f"net.unix.max_dgram_qlen is {qlen}: umockdev may abort the run when a uevent listener falls "
            f"behind. Fix: sysctl -w net.unix.max_dgram_qlen={UEVENT_QUEUE} (setup.sh does this)")
