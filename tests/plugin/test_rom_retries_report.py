"""A ROM whose first two exchanges fail (usbboot #87's "Failed control transfer (-7,24)") still boots, and the report
shows every attempt: a step per ROM exchange and the attempts in the USB transfer trace."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.plugin.test_rig_runs import PLUGIN, names, results_of, walk

pytestmark = pytest.mark.usefixtures("virtual_usb")


def test_failed_rom_exchanges_then_success_are_in_the_report(pytester: pytest.Pytester, make_rig: Callable[..., Path],
                                                             tmp_path: Path, suites: list[str]) -> None:
    results = tmp_path / "allure-results"
    rig = make_rig("plug-retry", port="11-1.6", extra="[virtual.usb]\nrom_failed_exchanges = 2\n")
    run = pytester.runpytest_subprocess(*PLUGIN, *suites, "--rig", str(rig), "--alluredir", str(results),
                                        "-k", "flash")
    assert run.ret == 0, run.stdout.str()[-3000:]
    flashed = [r for r in results_of(results).values() if any("usbboot.rom_transfer" in s for s in names(r)[0])]
    assert flashed, "no result shows the USB boot"
    steps, attachments = names(flashed[0])
    assert [s for s in steps if s.startswith("usbboot.rom_transfer")] == [
        "usbboot.rom_transfer", "usbboot.rom_transfer (attempt 2)", "usbboot.rom_transfer (attempt 3)"]
    sources = {a["name"]: a["source"] for node in [flashed[0], *walk(flashed[0])]
               for a in node.get("attachments", [])}
    trace = json.loads((results / sources["USB transfer trace"]).read_text())
    assert [a["outcome"] == "ok" for a in trace["rom_attempts"]] == [False, False, True]
    assert "timeout" in trace["rom_attempts"][0]["outcome"] and "USB transfer trace" in attachments

