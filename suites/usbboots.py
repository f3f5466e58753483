"""What the USB boot suites share: reaching every port of a rig, and each boot as a report step with evidence."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import allure
from hil.fixtures.evidence import StageSteps, attach_json, attach_text

from hil.control.usbselect import command_cable
from hil.matrix import Attempt, Cable
from hil.nightly import reports_root
from hil.rig import Rig


def reports_dir() -> Path:
    """Where the compatibility matrix's history and pictures go, beside the nightly reports."""
    return reports_root()


def rig_cabling(rig: Rig) -> tuple[tuple[str, ...], Cable | None]:
    """The ports a test can reach and how to move the module between them: a virtual rig moves its own
    cable; a real one runs its ``[usb.select]`` commands, or without them stays on the rig's first port."""
    if not rig.is_virtual:
        if all(port in rig.usb_select for port in rig.usb_ports) and len(rig.usb_ports) > 1:
            return rig.usb_ports, command_cable(rig, rig.usb_ports)
        return (rig.usb_port,), None
    from hil.virtual.rig import VirtualRig

    return rig.usb_ports, VirtualRig.running(rig.name).cable


class ReportedBoots:
    """Each boot as a report step with its stages as sub-steps; the controller and every failure's trace attached.
    Pass its ``step``, ``listener`` and ``progress`` to :func:`hil.matrix.run_matrix`."""

    def __init__(self) -> None:
        self._steps: StageSteps | None = None
        self._described: set[str] = set()

    @contextlib.contextmanager
    def step(self, port: str, number: int) -> Iterator[None]:
        with allure.step(f"usbboot via {port}, boot {number}"):
            yield

    def listener(self) -> StageSteps:
        self._steps = StageSteps()
        return self._steps

    def progress(self, attempt: Attempt) -> None:
        if self._steps is not None:
            self._steps.close()
        if attempt.port not in self._described:
            self._described.add(attempt.port)
            attach_text(f"host controller of {attempt.port}", attempt.controller.describe())
        attach_text("outcome", attempt.describe() + "\n")
        if attempt.error is not None:
            attach_json(f"USB transfer trace ({attempt.port}, boot {attempt.attempt})",
                        attempt.error.evidence.get("trace") or {})
            attach_json(f"ROM exchanges ({attempt.port}, boot {attempt.attempt})",
                        attempt.error.evidence.get("rom_attempts") or [])
            host_bug_evidence(attempt)


def host_bug_evidence(attempt: Attempt) -> None:
    """What a person reproducing a host bug needs: kernel log lines of the port, usbmon text of its bus (or how
    to enable it), speeds per stage, controller, driver and kernel."""
    facts = attempt.evidence
    where = f"{attempt.port}, boot {attempt.attempt}"
    lines = facts.get("kernel_log") or []
    attach_text(f"kernel log of {where}", "".join(f"{line}\n" for line in lines)
                or (facts.get("kernel_log_note") or "no kernel lines about this port") + "\n")
    attach_text(f"usbmon of {where}", facts.get("usbmon") or (facts.get("usbmon_note") or "no usbmon text") + "\n")
    controller = facts.get("controller") or {}
    attach_text(f"host of {where}", "".join(f"{k}  {v}\n" for k, v in (
        ("kernel", facts.get("kernel", "")), ("driver", controller.get("driver", "")),
        ("controller", controller.get("label", "")), ("speeds", facts.get("speeds", {})))))
