"""Rendering allure-results to HTML with the pinned Allure 3, offline, with the project's categories."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import hil.report.render
from hil.errors import InfrastructureError, InputError
from hil.report import render_report, write_categories, write_environment

# A tag that makes the browser fetch something by itself, and the host it fetches from.
_FETCHING_TAG = re.compile(
    r"<(?:script|link|img|iframe|source|video|audio|embed)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//([^/\"'\s>:]+)",
    re.IGNORECASE,
)


def _outside_hosts(index: Path) -> set[str]:
    hosts = set(_FETCHING_TAG.findall(index.read_text(encoding="utf-8")))
    return hosts - {"localhost", "127.0.0.1"}


def _test_results(report: Path) -> dict[str, dict]:
    files = (report.parent / "data" / "test-results").glob("*.json")
    return {result["name"]: result for result in (json.loads(f.read_text()) for f in files)}


def _categorised(report: Path) -> dict[str, str]:
    """Test name -> category name, as the report's own categories widget files them."""
    nodes = json.loads((report.parent / "widgets" / "categories.json").read_text())["nodes"]

    def tests_under(node_id: str) -> list[str]:
        node = nodes[node_id]
        return [node["name"]] if node["type"] == "tr" else sum((tests_under(c) for c in node["childrenIds"]), [])

    categories = [node for node in nodes.values() if node["type"] == "category"]
    return {test: category["name"] for category in categories for test in tests_under(category["id"])}


def test_report_shows_every_test_with_its_steps_and_attachment(served_report: Path, sample: SimpleNamespace) -> None:
    results = _test_results(served_report)
    assert set(results) == set(sample.expected_category)
    step = results["test_flash_and_boot"]["steps"][0]
    assert step["name"] == sample.step
    link = next(s["link"] for s in step["steps"] if s["type"] == "attachment")
    assert link["name"] == sample.attachment
    stored = served_report.parent / "data" / "attachments" / f"{link['id']}{link['ext']}"
    assert stored.read_text() == sample.content


@pytest.mark.parametrize("layout", ["served_report", "single_file_report"])
def test_report_loads_nothing_from_outside_the_machine(layout: str, request: pytest.FixtureRequest) -> None:
    index: Path = request.getfixturevalue(layout)
    html = index.read_text(encoding="utf-8")
    assert "googletagmanager" not in html and "gtag(" not in html
    assert _outside_hosts(index) == set()


def test_single_file_report_needs_no_other_file(single_file_report: Path) -> None:
    assert not (single_file_report.parent / "data").exists()
    assert list(single_file_report.parent.glob("*.js")) == []
    assert 'src="data:text/javascript;base64,' in single_file_report.read_text(encoding="utf-8")


def test_categories_separate_rig_from_module_failures(served_report: Path, sample: SimpleNamespace) -> None:
    expected = {test: category for test, category in sample.expected_category.items() if category}
    assert _categorised(served_report) == expected


def test_categories_json_files_failures_the_same_way_for_allure2(
    allure_results: Path, tmp_path: Path, sample: SimpleNamespace
) -> None:
    """Allure 2 takes the first rule whose statuses hold and whose regex matches the whole message."""
    categories = json.loads(write_categories(tmp_path).read_text())
    for result in (json.loads(f.read_text()) for f in allure_results.glob("*-result.json")):
        message = result.get("statusDetails", {}).get("message", "")
        matching = [
            rule["name"]
            for rule in categories
            if result["status"] in rule["matchedStatuses"] and re.fullmatch(rule.get("messageRegex", "(?s).*"), message)
        ]
        assert matching[:1] == [c for c in [sample.expected_category[result["name"]]] if c], result["name"]


def test_environment_properties_reach_the_report(allure_results: Path, tmp_path: Path) -> None:
    props = {
        "rig": "virtual-cm4",
        "module model": "CM4 (8 GB, eMMC)",
        "image sha256": "sha256:0f=ab",
        "host controller": "xhci_hcd 0000:01:00.0 # VL805",
        "payload": "C:\\payloads\\ünïcode 𝄞\nsecond line",
    }
    results = shutil.copytree(allure_results, tmp_path / "results")
    written = write_environment(results, props)
    written.read_text(encoding="ascii")  # Allure 2 reads it as ISO-8859-1: plain ASCII is safe for both
    index = render_report(results, tmp_path / "report")
    shown = json.loads((index.parent / "widgets" / "allure_environment.json").read_text())
    assert {entry["name"]: entry["values"] for entry in shown} == {key: [value] for key, value in props.items()}


@pytest.mark.parametrize("single_file", [False, True])
def test_the_timeline_lists_lanes_in_host_and_rig_order(allure_results: Path, tmp_path: Path,
                                                          single_file: bool) -> None:
    """Allure lays out hosts and lanes in the order it reads result files (sorted random names); the rendered
    timeline is in host, lane, start order whatever the file names."""
    results = shutil.copytree(allure_results, tmp_path / "results")
    files = sorted(results.glob("*-result.json"))
    for n, path in enumerate(files):  # the first files read get the last lanes
        data = json.loads(path.read_text())
        lane = f"rig-{len(files) - n}"
        data["labels"] = [*[x for x in data["labels"] if x["name"] not in ("host", "thread")],
                          {"name": "host", "value": "ctl-b" if n % 2 else "ctl-a"}, {"name": "thread", "value": lane}]
        data["start"], data["stop"] = 1000 + 10 * n, 1005 + 10 * n
        path.write_text(json.dumps(data))
    index = render_report(results, tmp_path / "report", single_file=single_file)
    if single_file:
        inline = re.search(r'd\("widgets/timeline\.json","([^"]*)"\)', index.read_text(encoding="utf-8"))
        assert inline is not None
        timeline = json.loads(base64.b64decode(inline[1]))
    else:
        timeline = json.loads((index.parent / "widgets" / "timeline.json").read_text())
    lanes = [(e["host"], e["thread"]) for e in timeline]
    assert len(lanes) == len(files) and lanes == sorted(lanes), lanes


def test_rendering_again_replaces_the_earlier_report(allure_results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    render_report(allure_results, out)
    render_report(allure_results, out, single_file=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left behind


def test_a_page_that_would_still_reach_outside_is_not_shipped(
    allure_results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after an allure upgrade that changes its analytics tag: the clean-up misses, the render refuses."""
    monkeypatch.setattr(hil.report.render, "_ANALYTICS", re.compile("(?!)"))
    with pytest.raises(InfrastructureError, match="googletagmanager"):
        render_report(allure_results, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_a_folder_that_is_not_a_report_is_left_alone(allure_results: Path, tmp_path: Path) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(InputError, match="not an earlier report"):
        render_report(allure_results, tmp_path)
    assert keep.read_text() == "mine"


def test_a_missing_results_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--alluredir"):
        render_report(tmp_path / "absent", tmp_path / "report")


def test_an_allure_failure_is_a_report_stage_infrastructure_error(
    allure_results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "allurerc.json"
    broken.write_text(json.dumps({"categories": [{"messageRegex": "x"}]}))
    monkeypatch.setattr(hil.report.render, "ALLURE_CONFIG", broken)
    with pytest.raises(InfrastructureError, match=r"categories\[0\]\.name") as caught:
        render_report(allure_results, tmp_path / "report")
    assert caught.value.stage == "report"
    assert not (tmp_path / "report").exists()


def test_hil_report_merges_results_folders_and_keeps_a_bounded_history(allure_results: Path, tmp_path: Path) -> None:
    """`hil report` renders what two controllers gathered as one report; the history keeps the newest N runs."""
    from tests.hilrun import hil

    other = tmp_path / "other-results"
    other.mkdir()
    for result in allure_results.glob("*-result.json"):  # the same tests, as another controller ran them
        data = json.loads(result.read_text())
        data["uuid"] = "x" + data["uuid"][1:]
        data["name"] = data["name"] + "_on_controller_b"
        data["fullName"] = data["fullName"] + "_on_controller_b"
        data["historyId"] = "b" + data.get("historyId", "")[1:]
        data["testCaseId"] = "b" + data.get("testCaseId", "")[1:]
        (other / f"{data['uuid']}-result.json").write_text(json.dumps(data))
    history = tmp_path / "history.jsonl"
    for run in range(3):
        done = hil("report", str(allure_results), str(other), "--out", str(tmp_path / f"run{run}"),
                   "--history", str(history), "--history-limit", "2", timeout=240)
        assert done.returncode == 0, done.stderr
    names = {r["name"] for r in _test_results(tmp_path / "run2" / "index.html").values()}
    assert {"test_flash_and_boot", "test_flash_and_boot_on_controller_b"} <= names
    assert len(history.read_text().splitlines()) == 2
    missing = hil("report", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "r"))
    assert missing.returncode == 2 and "no allure-results folder" in missing.stderr
