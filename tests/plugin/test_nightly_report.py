"""Two nightly runs on two virtual rigs, then the second night's report as a person reads it in Chromium: the flash
evidence on the flash test's own page, the timeline's lanes and the Metadata by rig in name order, and the USB boot
matrix's history of each port."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hil.fixtures.runfacts import MATRIX_HISTORY, RIG_FACTS

from tests.allure_files import global_attachment
from tests.hilrun import hil_command
from tests.report.browser import look_at, page_id, serve, stop, tab

RIGS = (("zeta-cm4", "cm4", "9-1.4"), ("alpha-cm1", "cm1", "10-1.2"))  # given out of order: the report sorts them
FLASH_TEST = "test_image_is_written_and_verified[zeta-cm4]"
SELECTED = "test_image_is_written_and_verified or test_matrix_through_every_port"


@pytest.fixture(scope="module")
def nights(wrapper: str, make_module_rig: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
           ) -> SimpleNamespace:
    """``hil nightly`` twice on the same rigs and reports folder; the second night's results and report."""
    root = tmp_path_factory.mktemp("nights")
    rigs = [str(make_module_rig(name, model, port)) for name, model, port in RIGS]
    for night in ("first", "second"):
        argv, env = hil_command("nightly", "--rig", *rigs, "--report-dir", str(root / night), "--", "-k", SELECTED)
        env.update(HIL_REPORTS_DIR=str(root / "reports"), HIL_MATRIX_ATTEMPTS="1")
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "tests: 4 passed" in done.stdout, done.stdout
    return SimpleNamespace(results=root / "second" / "allure-results", index=root / "second" / "html" / "index.html")


@pytest.fixture(scope="module")
def seen(nights: SimpleNamespace) -> dict[str, Any]:
    """One walk through the second report: the flash test's page (reached by its own address, as a link to it
    would), the first page's Metadata and tree, the timeline, and the global attachment of the matrix."""
    with serve(nights.index) as url:
        walk = [stop("flash test", "image sha256", goto=f"{url}#{page_id(nights.index, FLASH_TEST)}",
                     click=(tab("Attachments"), "flash and verify figures")),
                stop("home", "Metadata", goto=url),
                stop("timeline", "alpha-cm1", goto=f"{url}#timeline"),
                stop("matrix", "10-1.2", goto=url, click=(tab("Global Attachments"), MATRIX_HISTORY))]
        return look_at(walk)


def _page(seen: dict[str, Any], name: str) -> str:
    """What a stop showed, once it showed what it waited for and nothing was fetched from outside."""
    assert seen["outside"] == []
    assert [e for e in seen["errors"] if e.startswith(f"{name}:") or "went away" in e] == [], seen["errors"]
    return str(seen["stops"][name])


def test_the_flash_evidence_is_on_the_flash_tests_own_page(seen: dict[str, Any], nights: SimpleNamespace) -> None:
    page = _page(seen, "flash test")
    assert FLASH_TEST in page
    for attachment in ("flash and verify figures", "USB transfer trace", "console (zeta-cm4, this test)"):
        assert attachment in page, attachment
    written = re.search(r"written\s+([\d,]+) bytes \([\d.]+ MiB\) of 268,435,456 bytes .* \(([\d.]+) MB/s\)", page)
    verified = re.search(r"verified\s+([\d,]+) bytes .* \(([\d.]+) MB/s\)", page)
    assert written and verified, page
    assert written[1] == verified[1] and int(written[1].replace(",", "")) > 0 and float(written[2]) > 0
    facts = global_attachment(nights.results, RIG_FACTS)
    sha256 = re.search(r"zeta-cm4\n(?:  .*\n)*?  image\.sha256 +([0-9a-f]{64})", facts)
    assert sha256 and re.search(rf"image sha256\s+{sha256[1]}", page), page


def test_timeline_lanes_metadata_and_tree_are_by_rig_in_name_order(seen: dict[str, Any]) -> None:
    lanes = _page(seen, "timeline")
    assert 0 <= lanes.index("alpha-cm1") < lanes.index("zeta-cm4") and "MainThread" not in lanes, lanes
    home = _page(seen, "home")
    metadata = home.split("Metadata", 1)[1]
    assert re.search(r"host\s+\S+ \(Linux", metadata), metadata
    assert re.search(r"alpha-cm1\s+cm1 \(bcm2835\), USB 10-1\.2, test-cm1-256MiB\.img, build-id \w+\s+"
                     r"zeta-cm4\s+cm4 \(bcm2711\), USB 9-1\.4, test-cm4-256MiB\.img, build-id \w+", metadata), metadata
    tree = metadata.split("Sort by", 1)[1]
    assert 0 <= tree.index("alpha-cm1") < tree.index("zeta-cm4"), tree


def test_each_ports_matrix_history_is_in_the_nightly_report(seen: dict[str, Any], nights: SimpleNamespace) -> None:
    history = global_attachment(nights.results, MATRIX_HISTORY)
    rows = {(m[1], m[2]): m[3] for m in re.finditer(r"^(\S+) +(\S+) +.*\) +(pass 1/1 .*)$", history, re.M)}
    assert set(rows) == {("alpha-cm1", "10-1.2"), ("zeta-cm4", "9-1.4")}, history
    for row in rows.values():  # two nights, one attempt each: both shown, oldest first
        assert re.fullmatch(r"pass 1/1 +\S+ \S+ +2 +2/2 +1/1 1/1", row), row
    page = _page(seen, "matrix")
    assert all(re.search(rf"{rig} +{port} +.*pass 1/1 .* 1/1 1/1", page) for rig, port in rows), page
