"""When a failed boot is a host-controller incompatibility: only on evidence (:func:`hil.matrix.classify`)."""

from __future__ import annotations

from hil.control.hostctl import HostController
from hil.errors import HilError, InfrastructureError, ProductError
from hil.matrix import HOST, PASS, Attempt, classify
from hil.report.environment import HOST_INCOMPATIBILITY_PHRASE


def attempt(port: str, ok: bool, *, rig: str = "r", error: HilError | None = None) -> Attempt:
    controller = HostController(port, "ehci-pci", "pci", f"0000:00:{port[:2]}.0", "8086:1e26", ())
    error = error or InfrastructureError("announce(24) for boot message: io", stage="usbboot.rom_transfer")
    return Attempt(rig, "cm1", port, controller, 1, ok, PASS if ok else error.fault.value, {}, {},
                   "" if ok else str(error), error=None if ok else error)


def test_a_module_that_boots_through_another_port_in_the_run_makes_it_a_host_incompatibility() -> None:
    runs = [attempt("15-1", True), attempt("16-1", False), attempt("16-1", False)]
    changed = classify(runs)
    assert changed == runs[1:] and all(a.category == HOST for a in changed)
    assert changed[0].message.startswith(f"{HOST_INCOMPATIBILITY_PHRASE} on 16-1 [ehci-pci")
    assert "booted through 15-1" in changed[0].message


def test_a_module_failing_on_every_port_stays_infrastructure() -> None:
    runs = [attempt("15-1", False), attempt("16-1", False)]
    assert classify(runs) == [] and [a.category for a in runs] == ["infrastructure", "infrastructure"]


def test_another_rig_booting_is_no_evidence() -> None:
    runs = [attempt("15-1", True, rig="other"), attempt("16-1", False)]
    assert classify(runs) == []


def test_product_failures_keep_their_fault() -> None:
    runs = [attempt("15-1", True), attempt("16-1", False, error=ProductError("status 0x1", stage="usbboot.x"))]
    assert classify(runs) == [] and runs[1].category == "product"


def test_the_port_history_can_be_the_evidence() -> None:
    """A real rig cabled to one port per run: the history shows 16-1 failing while 15-1 passes."""
    failing = attempt("16-1", False)
    assert classify([failing], {"16-1": (1, 5), "15-1": (4, 4)}) == [failing]
    assert "booted 1/5 times in this rig's history while 15-1 booted 4/4" in failing.message
    for history in ({"16-1": (1, 5)}, {"16-1": (3, 5), "15-1": (4, 4)}, {"16-1": (0, 5), "15-1": (1, 4)}):
        again = attempt("16-1", False)
        assert classify([again], history) == [], history
