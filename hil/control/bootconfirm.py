"""Proof, from the serial console, that the module booted the image just written.

A flash that "succeeded" proves little: the module may boot an older image, fall back to USB boot, or
panic. After the power cycle the console must show each boot milestone in order (the EEPROM
bootloader's banner on CM4/CM5, the kernel's first line, any extra rig markers, the login prompt),
each within its stage timeout counted from power-on; then, after login, ``/etc/build-id`` must name the
expected build. The time to each milestone is recorded so boot-time regressions show up in reports.

Failures are classified: silence where a bootloader always talks, or an unreadable line, points at the
rig; a missing milestone, a forbidden line (panic, Oops) or another build-id at the module or image.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hil.control.console import Console
from hil.errors import Fault, HilError, InfrastructureError, ProductError, StageTimeout
from hil.rig import Rig

BUILD_ID_MARKER = "build_id"  # a rig marker whose first group is the build-id printed during boot
BUILD_ID_FILE = "/etc/build-id"

#: What the console shows when a boot goes wrong in a known way, and what it means.
_HINTS: tuple[tuple[str, str], ...] = (
    (r"Filesystem not found|Failed to open device: 'sdcard'",
     "the bootloader found no boot filesystem on the eMMC: it is blank or the image is damaged"),
    (r"Waiting for root device", "the kernel cannot find its root filesystem: check root= in cmdline.txt"),
)


@dataclass
class BootRecord:
    """One boot: which build came up and how long each milestone took after power-on (seconds)."""

    rig: str
    model: str
    expected_build_id: str | None
    build_id: str | None = None
    markers: dict[str, float] = field(default_factory=dict)
    log: str | None = None
    console_from: int = 0  # the console's line index where this boot starts (for report slices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def boot_markers(rig: Rig) -> list[tuple[str, str]]:
    """The milestones a boot of this rig shows, in order.

    The bootloader banner only exists on modules with an EEPROM bootloader (CM1/CM3/CM4S boot silently
    until the kernel); extra rig markers come between the kernel and the login prompt."""
    names = (["bootloader"] if rig.model.has_eeprom else []) + ["kernel"]
    names += [n for n in rig.markers if n not in ("bootloader", "kernel", "login")]
    names.append("login")
    return [(n, rig.markers[n]) for n in names if n in rig.markers]


def confirm_boot(console: Console, rig: Rig, *, powered_at: float, expect_build_id: str | None = None,
                 login: bool = True, usb_fallback: Callable[[], bool] | None = None,
                 console_from: int = 0) -> BootRecord:
    """Follow a boot that started at ``powered_at`` (console time) and prove which build it is.

    ``usb_fallback`` tells whether the boot ROM now sits on the USB port: where a silent module has
    fallen back to USB boot, its eMMC had nothing bootable."""
    record = BootRecord(rig.name, rig.model.name, expect_build_id,
                        log=str(console.log_path) if console.log_path else None, console_from=console_from)
    for name, pattern in boot_markers(rig):
        timeout = rig.timeouts.get(name, rig.timeouts["login"])
        left = max(0.0, powered_at + timeout - console.now())
        try:
            m = console.expect(pattern, left, stage=f"boot.{name}", what=f"{name} marker {pattern!r}")
        except StageTimeout as e:
            raise _classify(e, console, rig, name, timeout, usb_fallback) from None
        record.markers[name] = round(console.arrival(m) - powered_at, 3)
        if name == BUILD_ID_MARKER:
            _check_build_id(m.group(1) if m.groups() else m.group(0), expect_build_id, "printed during boot")
            record.build_id = m.group(1) if m.groups() else m.group(0)
    if login:
        try:
            console.login(timeout=rig.timeouts["login"], login_prompt=rig.markers["login"], prompt_seen=True)
            result = console.run(f"cat {BUILD_ID_FILE}", timeout=rig.timeouts["command"])
        except StageTimeout as e:
            raise _retyped(e) from None
        if result.status != 0:
            raise ProductError(f"the module booted, but {BUILD_ID_FILE} cannot be read ({result.output.strip()!r})"
                               ": the image is not a test image or not the one written", stage="boot.build-id")
        record.build_id = result.output.strip()
        _check_build_id(record.build_id, expect_build_id, f"in {BUILD_ID_FILE}")
        record.markers["shell"] = round(console.now() - powered_at, 3)
    return record


def _check_build_id(got: str, expected: str | None, where: str) -> None:
    if expected is not None and got != expected:
        raise ProductError(f"the module booted build-id {got!r} ({where}), not {expected!r}, the image just "
                           "written: the write did not reach the eMMC, or the module booted something else",
                           stage="boot.build-id", got=got, expected=expected)


def _classify(e: StageTimeout, console: Console, rig: Rig, name: str, timeout: float,
              usb_fallback: Callable[[], bool] | None) -> HilError:
    """A missing milestone, blamed on whoever the evidence points at."""
    if console.received == 0:
        if usb_fallback is not None and usb_fallback():
            return ProductError(f"the console stayed silent and the boot ROM appeared on USB port {rig.usb_port}: "
                                "the module found nothing bootable on its eMMC (blank or damaged image)",
                                stage=e.stage, log=console.log_path and str(console.log_path))
        if rig.model.has_eeprom:
            return InfrastructureError(
                f"nothing at all arrived on the console {console.device} within {timeout:g} s of power-on, though "
                f"a {rig.model.name}'s bootloader always prints its banner. Fix: check the USB-serial adapter, its "
                "wiring (TX/RX, ground) and that power reaches the module", stage=e.stage,
                log=console.log_path and str(console.log_path))
    tail = console.tail(40)
    for pattern, hint in _HINTS:
        if re.search(pattern, tail):
            return ProductError(f"{e.message}\n{hint}", stage=e.stage, **e.evidence)
    return _retyped(e)


def _retyped(e: StageTimeout) -> HilError:
    """A stage timeout as the error class of whoever it blames."""
    cls = ProductError if e.fault is Fault.PRODUCT else InfrastructureError
    return cls(e.message, stage=e.stage, **e.evidence)
