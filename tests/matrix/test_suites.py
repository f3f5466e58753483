"""The host-compatibility and matrix suites on the virtual matrix rigs: the CM1 fails its hypothesis port and boots
through the other, so the failure lands in the report's host-incompatibility category with the controller, the
trace and the host-bug evidence attached; the CM3 passes both ports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

if os.geteuid() != 0 or "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("needs root and umockdev: run pytest as root under umockdev-wrapper", allow_module_level=True)

import hil.virtual.usb.umockdev_bus  # noqa: E402, F401 (the one testbed, made before any pytester)

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]
PLUGIN = ("-p", "hil.fixtures.plugin", "-p", "no:cacheprovider")


def category(message: str) -> str:
    """The first category of report/allurerc.json whose pattern matches a failed result's message."""
    for c in json.loads((REPO / "report" / "allurerc.json").read_text())["categories"]:
        if "messageRegex" not in c or re.fullmatch(c["messageRegex"], message):
            return str(c["name"])
    return ""


def results(folder: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in folder.glob("*-result.json"):
        result = json.loads(path.read_text())
        found[result["name"]] = result
    return found


def attachments(node: dict[str, Any]) -> list[str]:
    return [a["name"] for a in node.get("attachments", [])] + [n for s in node.get("steps", []) for n in attachments(s)]


def test_cm1_fails_its_hypothesis_port_as_a_host_incompatibility_and_cm3_passes(
        pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_USB_BOOTS", "2")
    monkeypatch.setenv("HIL_MATRIX_ATTEMPTS", "1")
    monkeypatch.setenv("HIL_REPORTS_DIR", str(tmp_path / "reports"))
    allure = tmp_path / "allure-results"
    suites = [str(REPO / "suites" / name) for name in ("test_cm1_quirk.py", "test_matrix.py")]
    run = pytester.runpytest_subprocess(*PLUGIN, *suites,
                             "--rig", str(REPO / "rigs" / "virtual-cm1-matrix.toml"),
                             "--rig", str(REPO / "rigs" / "virtual-cm3-matrix.toml"), "--alluredir", str(allure))
    run.assert_outcomes(passed=3, failed=1)
    by_name = results(allure)
    cm1 = by_name["test_usb_boot_pass_rate_on_every_port[virtual-cm1-matrix]"]
    message = cm1["statusDetails"]["message"]
    assert cm1["status"] == "failed"
    assert category(message) == "Host-controller incompatibility (the module boots through another port)"
    assert "booted through 15-1" in message
    assert "16-1 [ehci-pci 8086:1e26" in message and "15-1 [xhci_hcd 8086:a36d" in message
    assert "0/2 boots" in message and "2/2 boots" in message
    names = attachments(cm1)
    assert {"host controller of 15-1", "host controller of 16-1", "USB transfer trace (16-1, boot 1)",
            "USB transfer trace (16-1, boot 2)", "ROM exchanges (16-1, boot 1)", "kernel log of 16-1, boot 1",
            "usbmon of 16-1, boot 1", "host of 16-1, boot 1"} <= set(names)
    assert not [n for n in names if n.startswith("USB transfer trace (15-1")]
    assert by_name["test_usb_boot_pass_rate_on_every_port[virtual-cm3-matrix]"]["status"] == "passed"
    for rig in ("virtual-cm1-matrix", "virtual-cm3-matrix"):
        matrix = by_name[f"test_matrix_through_every_port[{rig}]"]
        assert matrix["status"] == "passed"
        shown = {n for n in attachments(matrix) if "matrix" in n and not n.startswith("console (")}  # rig's name
        assert shown == {"compatibility matrix"}
    assert (tmp_path / "reports" / "matrix-virtual-cm3-matrix.png").exists()
