"""Host-controller compatibility (the CM1 USB packet note): USB-boot the module N times through each of its rig's
ports and require a pass rate.

The BCM2835 (CM1) boot ROM "returns a slightly incorrect USB packet" that some ports refuse (usbboot-protocol.md
section 6); nothing public says which packet. So a failure is a host-controller incompatibility only on evidence
(:func:`hil.matrix.classify`): the same module booted through another port in this run, or the port's history
shows it failing while others pass. Then the test fails with
:data:`~hil.report.environment.HOST_INCOMPATIBILITY_PHRASE`, which the report files apart from rig and module
failures; otherwise the failure keeps its own fault (a cable or power fault is infrastructure). Each failed
boot's kernel log lines, usbmon text (or how to enable it), speeds, controller and ROM exchanges are attached.

N comes from ``HIL_USB_BOOTS`` (default 3); parametrize ``usb_boots`` or ``pass_rate`` to override. Every
attempt is also recorded in the compatibility matrix's history (``HIL_REPORTS_DIR``, default ``reports``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hil.fixtures.evidence import attach_text
from hil.fixtures.station import RigStation

from hil.control.lifecycle import Lifecycle
from hil.errors import HilError
from hil.matrix import Attempt, MatrixStore, run_matrix
from hil.report.environment import HOST_INCOMPATIBILITY_PHRASE
from hil.rig import Rig
from suites.usbboots import ReportedBoots, reports_dir, rig_cabling

pytestmark = pytest.mark.needs("nrpi_boot")


class KnownIncompatibility(AssertionError):
    """The module failed only on ports where the evidence says the host controller is to blame."""


@pytest.fixture
def usb_boots() -> int:
    return int(os.environ.get("HIL_USB_BOOTS", "3"))


@pytest.fixture
def pass_rate() -> float:
    """The share of boots per port that must succeed."""
    return 1.0


def boot_every_port(station: RigStation, lifecycle: Lifecycle, rig: Rig, payload: Path | None,
                    boots: int) -> list[Attempt]:
    ports, cable = rig_cabling(rig)
    report = ReportedBoots()
    with MatrixStore(reports_dir()) as store:
        _, attempts = run_matrix(lifecycle, boots, station.payload(payload), store, ports=ports, cable=cable,
                                 listener=report.listener, step=report.step, progress=report.progress)
    attach_text("boots", "".join(a.describe() + "\n" for a in attempts))
    return attempts


def test_usb_boot_pass_rate_on_every_port(station: RigStation, lifecycle: Lifecycle, rig: Rig,
                                          payload: Path | None, usb_boots: int, pass_rate: float) -> None:
    attempts = boot_every_port(station, lifecycle, rig, payload, usb_boots)
    by_port: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_port.setdefault(a.port, []).append(a)
    short = {port: runs for port, runs in by_port.items() if sum(a.ok for a in runs) < pass_rate * len(runs)}
    if not short:
        return
    summary = "; ".join(f"{port} [{runs[0].controller.label}] {sum(a.ok for a in runs)}/{len(runs)} boots"
                        for port, runs in by_port.items())
    failed = [a for runs in short.values() for a in runs if not a.ok]
    other = next((a for a in failed if not a.incompatible), None)
    if other is not None:  # a rig or module fault: it keeps its own category
        assert other.error is not None
        error: HilError = other.error
        error.add_note(f"boots per port (pass rate {pass_rate:.0%} required): {summary}; "
                       f"{sum(a.incompatible for a in failed)} failure(s) classified as host-controller "
                       "incompatibilities (another port booted the module)")
        raise error
    raise KnownIncompatibility(f"{HOST_INCOMPATIBILITY_PHRASE} on {', '.join(short)}: {summary}. {failed[0].message}. "
                               f"Fix: cable the {rig.model.name} to a port whose controller passes, and report the "
                               "attached kernel log and usbmon trace upstream (raspberrypi/usbboot)")
