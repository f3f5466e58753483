"""The rendered report as a person sees it in headless Chromium (Debian's), with the lab's network closed."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hil.report import render_report
from tests.report.browser import look_at, serve, stop, tab


def _walk(url: str, sample: SimpleNamespace) -> list[dict[str, Any]]:
    """Home, the flash test, its step and attachment (clicked through the tree), then two categories."""
    walk = [stop("home", "test_flash_and_boot", goto=url),
            stop("test", sample.step, click=("test_flash_and_boot",)),
            stop("step", sample.attachment, click=(sample.step,)),
            stop("attachment", sample.content, click=(sample.attachment,))]
    for category, test in (("Rig (infrastructure) failures", "test_rig_failure"),
                           ("Module (product) failures", "test_module_failure")):
        walk.append(stop(f"category {category}", test, goto=url, click=(tab("Categories"), category)))
    return walk


def _check(seen: dict, sample: SimpleNamespace) -> None:
    assert seen["outside"] == []
    assert seen["errors"] == []
    stops = seen["stops"]
    assert all(test in stops["home"] for test in sample.expected_category)
    assert sample.step in stops["test"]
    assert sample.attachment in stops["step"]
    assert sample.content in stops["attachment"]
    rig = stops["category Rig (infrastructure) failures"]
    assert "test_rig_failure" in rig.split("Rig (infrastructure) failures", 1)[1].split("Module (product)", 1)[0]
    module = stops["category Module (product) failures"]
    assert "test_module_failure" in module.split("Module (product) failures", 1)[1].split("Unclassified", 1)[0]


def test_served_report_shows_steps_attachment_and_categories(served_report: Path, sample: SimpleNamespace) -> None:
    with serve(served_report) as url:
        _check(look_at(_walk(url, sample)), sample)


def test_single_file_report_opens_from_disk(single_file_report: Path, sample: SimpleNamespace) -> None:
    _check(look_at(_walk(single_file_report.as_uri(), sample)), sample)


def test_a_second_run_shows_the_first_in_its_history(allure_results: Path, tmp_path: Path,
                                                      sample: SimpleNamespace) -> None:
    """Two renders sharing a history file, as two nightly runs do: the second one's test page counts one
    earlier run; the first had none to show."""
    history = tmp_path / "reports" / "history.jsonl"
    first = render_report(allure_results, tmp_path / "first", history=history)
    second = render_report(allure_results, tmp_path / "second", history=history)
    with serve(first) as url:
        before = look_at(_walk(url, sample))["stops"]["test"]
    with serve(second) as url:
        after = look_at(_walk(url, sample))
    _check(after, sample)
    assert not re.search(r"History\s+\d", before), before
    assert re.search(r"History\s+1\b", after["stops"]["test"]), after["stops"]["test"]
    assert len(history.read_text().splitlines()) == 2
