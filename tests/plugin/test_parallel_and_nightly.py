"""Two virtual rigs in parallel (one xdist worker each), and ``hil nightly`` as a user runs it; then the exit
status the nightly job derives from the results."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hil.errors import ExitCode
from hil.nightly import read_outcome
from tests.allure_files import global_attachment
from tests.hilrun import hil


def test_two_rigs_run_in_parallel_one_worker_each(pytester: pytest.Pytester, make_rig: Callable[..., Path],
                                                  suites: list[str], virtual_usb: None, tmp_path: Path) -> None:
    results = tmp_path / "allure-results"
    run = pytester.runpytest_subprocess("-p", "hil.fixtures.plugin", "-p", "no:cacheprovider", *suites,
                                        "--rig", str(make_rig("plug-x4", "cm4", "9-1.4")),
                                        "--rig", str(make_rig("plug-x1", "cm1", "9-1.2")),
                                        "-n", "2", "--alluredir", str(results), timeout=240)
    run.assert_outcomes(passed=20, skipped=2)  # the cm1 has no EEPROM_nWP and no bootloader banner
    workers: dict[str, set[str]] = {}
    for path in results.glob("*-result.json"):
        labels = {label["name"]: label["value"] for label in json.loads(path.read_text())["labels"]}
        assert labels["thread"] == labels["rig"]  # the timeline's lane is the rig
        workers.setdefault(labels["rig"], set()).add(labels["worker"])  # "gw0 (<pid>-MainThread)"
    assert set(workers) == {"plug-x4", "plug-x1"}
    assert all(len(ids) == 1 for ids in workers.values()), workers
    assert workers["plug-x4"] != workers["plug-x1"] and all(w.startswith("gw") for w in set.union(*workers.values()))
    props = (results / "environment.properties").read_text().splitlines()  # each worker's facts reached the controller
    assert [line.split(",")[0] for line in props[1:]] == ["plug-x1=cm1 (bcm2835)", "plug-x4=cm4 (bcm2711)"]
    facts = global_attachment(results, "rig facts")
    x1, x4 = facts.index("plug-x1\n"), facts.index("plug-x4\n")
    assert x1 < facts.index("payload ", x1) < x4 < facts.index("image.sha256 ", x4)


def test_hil_nightly_runs_the_suites_and_renders_the_report(make_rig: Callable[..., Path], wrapper: str,
                                                           tmp_path: Path) -> None:
    report = tmp_path / "night"
    done = hil("nightly", "--rig", str(make_rig("plug-night")), "--report-dir", str(report), "--single-file", "--",
               "-k", "test_rig_selfcheck or test_flash_and_boot", timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tests: 11 passed" in done.stdout
    assert f"report: {report / 'html' / 'index.html'} (opens from disk)" in done.stdout
    assert (report / "html" / "index.html").is_file()
    assert (report / "junit.xml").read_text().count("<testcase ") == 11
    assert (report / "allure-results" / "environment.properties").is_file()
    history = Path(os.environ["HIL_REPORTS_DIR"]) / "history.jsonl"
    first_run = json.loads(history.read_text().splitlines()[-1])["uuid"]
    again = hil("nightly", "--rig", str(make_rig("plug-night")), "--report-dir", str(tmp_path / "again"),
                "--single-file", "--", "-k", "test_rig_selfcheck", timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [json.loads(line)["uuid"] for line in history.read_text().splitlines()][-2] == first_run
    assert first_run in (tmp_path / "again" / "html" / "index.html").read_text()  # shown in the second report


def test_hil_nightly_refuses_a_broken_rig_file(tmp_path: Path) -> None:
    rig = tmp_path / "bad.toml"
    rig.write_text('model = "cm4"\n')
    done = hil("nightly", "--rig", str(rig), "--report-dir", str(tmp_path / "r"), timeout=60)
    assert done.returncode == ExitCode.INPUT
    assert "bad.toml: emmc: is missing" in done.stderr


def test_hil_nightly_help_lists_every_suite_that_runs() -> None:
    done = hil("nightly", "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    suites = sorted((Path(__file__).resolve().parents[2] / "suites").glob("test_*.py"))
    assert len(suites) >= 5
    for suite in suites:  # each with its title, read from the file
        title = suite.read_text().split('"""')[1].split(":")[0].split("\n")[0]
        assert suite.name in done.stdout and title in " ".join(done.stdout.split()), suite.name


def _result(folder: Path, name: str, status: str, message: str = "", rig: str = "r1") -> None:
    data = {"name": name, "status": status, "labels": [{"name": "rig", "value": rig}],
            "statusDetails": {"message": message}}
    (folder / f"{name}-result.json").write_text(json.dumps(data))


@pytest.mark.parametrize(("failures", "code"), [
    ([], ExitCode.OK),
    ([("broken", "hil.fixtures.faults.InputFailure: [input] [usbboot.payload] no payload")], ExitCode.INPUT),
    ([("broken", "hil.fixtures.faults.RigFailure: [infrastructure] [usbboot.rom] no ROM"),
      ("broken", "hil.fixtures.faults.InputFailure: [input] [rig-file] bad")], ExitCode.INFRASTRUCTURE),
    ([("broken", "hil.fixtures.faults.RigFailure: [infrastructure] [usbboot.rom] no ROM"),
      ("failed", "hil.fixtures.faults.ModuleFailure: [product] [boot.build-id] other build")], ExitCode.PRODUCT),
    ([("failed", "AssertionError: assert 1 == 2")], ExitCode.PRODUCT),  # a test's own assertion: the module
    ([("broken", "KeyError: 'x'")], ExitCode.INFRASTRUCTURE),  # a crash in the test code: not the module's fault
])
def test_the_exit_status_is_the_worst_fault(tmp_path: Path, failures: list[tuple[str, str]], code: ExitCode) -> None:
    _result(tmp_path, "test_ok", "passed")
    _result(tmp_path, "test_skipped", "skipped", rig="r2")
    for i, (status, message) in enumerate(failures):
        _result(tmp_path, f"test_{i}", status, message)
    outcome = read_outcome(tmp_path)
    assert outcome.exit_code == code
    assert outcome.by_rig["r2"] == {"skipped": 1}
    assert len(outcome.faults) == len(failures)
    assert ("failures: " in outcome.summary()) == bool(failures)
