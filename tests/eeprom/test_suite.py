"""suites/test_eeprom.py on a virtual CM4 (EEPROM_nWP resting low) and a virtual CM5 (resting released), through
the project's pytest plugin, as a nightly run would do it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

PLUGIN = ("-p", "hil.fixtures.plugin", "-p", "no:cacheprovider")


@pytest.mark.usefixtures("virtual_usb")
def test_the_eeprom_suite_passes_on_virtual_cm4_and_cm5(pytester: pytest.Pytester, repo: Path,
                                                        make_rig: Callable[..., Path]) -> None:
    rigs = [make_rig("cm4", "suite-cm4", nwp_at_rest=True), make_rig("cm5", "suite-cm5")]
    run = pytester.runpytest_subprocess(*PLUGIN, str(repo / "suites" / "test_eeprom.py"),
                             *(arg for rig in rigs for arg in ("--rig", str(rig))))
    run.assert_outcomes(passed=14)  # every test on both rigs; none failed or skipped
