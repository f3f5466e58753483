"""Device-side time: hardware delays scaled by the rig's speed-up, interruptible by a power cut."""

from __future__ import annotations

import threading


class DeviceClock:
    def __init__(self, speedup: float = 1.0):
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self.speedup = speedup

    def scaled(self, seconds: float) -> float:
        """How long a delay of ``seconds`` on hardware lasts on this virtual module."""
        return seconds / self.speedup

    def sleep(self, seconds: float, cancel: threading.Event | None = None) -> bool:
        """Sleep a hardware delay. Returns False when ``cancel`` fired first (the module lost power)."""
        delay = self.scaled(seconds)
        if cancel is None:
            threading.Event().wait(delay)
            return True
        return not cancel.wait(delay)
