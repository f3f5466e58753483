"""The suites and the fixtures on virtual rigs, in this process: what lands in the Allure results, and the
failure policy (fault tags, the bounded USB boot retry with each attempt's evidence, a rig taken out)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.report import render_report
from tests.allure_files import global_attachment

pytestmark = pytest.mark.usefixtures("virtual_usb")
PLUGIN = ("-p", "hil.fixtures.plugin", "-p", "no:cacheprovider")


def results_of(folder: Path) -> dict[str, dict[str, Any]]:
    """Test name -> its result, with the steps of its fixtures' set-up put in front of its own."""
    befores: dict[str, list[dict[str, Any]]] = {}
    for path in folder.glob("*-container.json"):
        container = json.loads(path.read_text())
        for child in container.get("children", []):
            befores.setdefault(child, []).extend(container.get("befores", []))
    results = {}
    for path in folder.glob("*-result.json"):
        result = json.loads(path.read_text())
        result["steps"] = [*befores.get(result["uuid"], []), *result.get("steps", [])]
        results[result["name"]] = result
    return results


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for step in node.get("steps", []):
        yield step
        yield from walk(step)


def names(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Every step name and attachment name of a result, in order."""
    steps = list(walk(result))
    attachments = [a["name"] for node in (result, *steps) for a in node.get("attachments", [])]
    return [s["name"] for s in steps], attachments


def test_suites_on_a_virtual_cm4_leave_steps_attachments_and_environment(
        pytester: pytest.Pytester, make_rig: Callable[..., Path], tmp_path: Path, suites: list[str]) -> None:
    results, junit = tmp_path / "allure-results", tmp_path / "junit.xml"
    rig = make_rig("plug-run")
    run = pytester.runpytest_subprocess(*PLUGIN, *suites, "--rig", str(rig),
                             "--alluredir", str(results), "--junitxml", str(junit))
    run.assert_outcomes(passed=11)
    by_name = results_of(results)
    assert len(by_name) == 11
    assert all({"name": "rig", "value": "plug-run"} in r["labels"] for r in by_name.values())
    every_step = [s for r in by_name.values() for s in names(r)[0]]
    every_attachment = [a for r in by_name.values() for a in names(r)[1]]
    for stage in ("usbboot.rom", "usbboot.second_stage", "usbboot.file_server", "usbboot.mass_storage",
                  "disk.discovery", "disk.guard", "flash.write", "flash.verify", "flash.partitions", "flash.build-id",
                  "boot.bootloader", "boot.kernel", "boot.login"):
        assert any(s.startswith(stage) for s in every_step), stage
    for attachment in ("USB transfer trace", "flash and verify figures", "console slice", "boot-time figures"):
        assert attachment in every_attachment
    assert sum(s.startswith("flash test-cm4") for s in every_step) == 1  # written once, then reused
    assert any("is already on the eMMC of plug-run" in s for s in every_step)
    for name, result in by_name.items():  # each test shows the evidence of what it uses, not only the first
        fixtures = {p["name"] for p in result["steps"]}
        own = {a["name"] for a in result.get("attachments", [])}  # the test's own: its page's Attachments tab
        assert "console (plug-run, this test)" in own, name
        if "flashed" in fixtures:
            assert {"flash and verify figures", "USB transfer trace"} <= own, name
        if "booted" in fixtures:
            assert "boot-time figures" in own and "console slice" in names(result)[1], name
        assert [p["value"] for p in result["parameters"]] == [f"'plug-run ({rig})'"]  # not PosixPath('...')
        labels = {label["name"]: label["value"] for label in result["labels"]}
        assert labels["thread"] == "plug-run" and labels["worker"].endswith("MainThread")  # the timeline's lane
    figures = next(a for a in by_name["test_image_is_written_and_verified[plug-run]"]["attachments"]
                   if a["name"] == "flash and verify figures")
    text = (results / figures["source"]).read_text()
    assert re.search(r"written +[\d,]+ bytes \([\d.]+ MiB\) of 268,435,456 bytes .* \([\d.]+ MB/s\)", text), text
    assert re.search(r"verified +[\d,]+ bytes .* MB/s", text) and re.search(r"image sha256 +[0-9a-f]{64}\n", text)
    afters = [a["name"] for path in results.glob("*-container.json")
              for a in json.loads(path.read_text()).get("afters", [])]
    assert "station (teardown)" in afters and not [a for a in afters if "<lambda>" in a or "::" in a]
    facts = global_attachment(results, "rig facts")  # every fact, under the rig's name
    built = re.findall(r"image.build_id +(\w+)", facts)
    props = (results / "environment.properties").read_text().splitlines()  # the report's Metadata: a line a rig
    assert props[0].startswith("host=") and "Linux" in props[0] and len(built) == 1
    assert props[1:] == [f"plug-run=cm4 (bcm2711), USB 9-1.4, test-cm4-256MiB.img, build-id {built[0]}"]
    for line in ("module.model         cm4 (bcm2711)", "usb.port             9-1.4",
                 "usb.host_controller  xhci_hcd 8086", "image.sha256 ", "payload ", "host.kernel  Linux"):
        assert line in facts, line
    assert facts.index("plug-run\n") < facts.index("module.model")
    assert json.loads((results / "categories.json").read_text())[0]["name"]
    assert junit.read_text().count("<testcase ") == 11


FAILING = """
import pytest
from hil.errors import Fault


@pytest.mark.selfcheck
def test_console_alive(lifecycle, console, rig):
    lifecycle.power_on()
    console.expect(rig.markers["bootloader"], rig.timeouts["bootloader"], stage="selfcheck.console",
                   fault=Fault.INFRASTRUCTURE, what="bootloader banner")
    lifecycle.off()


def test_boots_another_build(station, flashed):
    station.boot("not-the-build-written")


def test_flashed(flashed):
    pass
"""


@pytest.fixture
def failing_run(pytester: pytest.Pytester, make_rig: Callable[..., Path],
                tmp_path: Path) -> tuple[pytest.RunResult, Path]:
    """Three rigs: a good one, one whose module drops off the bus during USB boot, one whose console is garbage."""
    pytester.makepyfile(test_failing=FAILING)
    rigs = [make_rig("plug-good", port="9-1.4"),
            make_rig("plug-usb", port="10-1.4", extra="[usb]\nrom_retries = 0\n[virtual.usb]\ndisconnect_at = 20000\n"),
            make_rig("plug-garbled", port="11-1.4", extra="[virtual.console]\ngarbage = true\n",
                     timeouts={"bootloader": 2})]
    results = tmp_path / "allure-results"
    run = pytester.runpytest_subprocess(*PLUGIN, *(a for rig in rigs for a in ("--rig", str(rig))),
                                        "--alluredir", str(results), "-rs")
    return run, results


def test_failures_carry_their_fault_and_a_broken_rig_is_taken_out(failing_run: tuple[pytest.RunResult, Path],
                                                                  tmp_path: Path) -> None:
    run, results = failing_run
    run.assert_outcomes(passed=3, failed=2, errors=2, skipped=2)
    by_name = results_of(results)

    wrong = by_name["test_boots_another_build[plug-good]"]
    assert wrong["status"] == "failed"
    assert wrong["statusDetails"]["message"].startswith("[product] [boot.build-id]")  # no class name

    first = by_name["test_boots_another_build[plug-usb]"]  # the flash failed for the rig's sake: retried once
    assert first["status"] == "broken"
    assert first["statusDetails"]["message"].startswith("[infrastructure] [usbboot.")
    steps, attachments = names(first)
    assert "usbboot" in steps and "usbboot (attempt 2 of 2)" in steps
    assert "usbboot error" in attachments and "usbboot error (attempt 2)" in attachments
    assert "USB transfer trace" in attachments and "USB transfer trace (attempt 2)" in attachments
    again = by_name["test_flashed[plug-usb]"]  # the next test needing the image fails at once, with the cause
    assert "failed earlier in this run" in again["statusDetails"]["message"]
    assert names(again)[0].count("usbboot") == 0

    garbled = by_name["test_console_alive[plug-garbled]"]
    assert garbled["statusDetails"]["message"].startswith("[infrastructure]")
    for test in ("test_boots_another_build", "test_flashed"):
        skipped = by_name[f"{test}[plug-garbled]"]
        assert skipped["status"] == "skipped"
        assert skipped["statusDetails"]["message"].startswith(
            "Skipped: rig plug-garbled is out of this run: its self-check test_console_alive[plug-garbled] failed: "
            "[infrastructure]")
    props = (results / "environment.properties").read_text()
    assert "plug-garbled=OUT of this run" in props and "plug-good=cm4 (bcm2711), USB 9-1.4" in props
    assert props.index("plug-garbled=") < props.index("plug-good=") < props.index("plug-usb=")  # sorted by name
    assert "rig.out              rig plug-garbled is out of this run" in global_attachment(results, "rig facts")

    index = render_report(results, tmp_path / "report")
    categories = json.loads((index.parent / "widgets" / "categories.json").read_text())
    members = {categories["nodes"][root]["name"]: json.dumps(_subtree(categories, root))
               for root in categories["roots"]}
    assert "test_boots_another_build[plug-good]" in members["Module (product) failures"]
    assert "test_boots_another_build[plug-usb]" in members["Rig (infrastructure) failures"]
    assert "test_console_alive[plug-garbled]" in members["Rig (infrastructure) failures"]


def _subtree(categories: dict[str, Any], node_id: str) -> list[Any]:
    node = categories["nodes"][node_id]
    return [node, *(_subtree(categories, child) for child in node.get("childrenIds", node.get("children", [])))]
