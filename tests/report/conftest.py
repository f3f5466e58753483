"""A real allure-results folder, made once per session by allure-pytest, and the reports rendered from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hil.report import HOST_INCOMPATIBILITY_PHRASE, render_report

# Test name -> the category its failure must land in (None: it passes).
EXPECTED_CATEGORY = {
    "test_flash_and_boot": None,
    "test_rig_failure": "Rig (infrastructure) failures",
    "test_module_failure": "Module (product) failures",
    "test_cm1_quirk": "Host-controller incompatibility (the module boots through another port)",
    "test_untagged_failure": "Unclassified failures (no fault tag)",
}
STEP, ATTACHMENT, CONTENT = "usbboot.rom", "console slice", "ROM answered on port 1-1.3"

SAMPLE = f'''
import allure


def test_flash_and_boot():
    with allure.step("{STEP}"):
        allure.attach("{CONTENT}", name="{ATTACHMENT}", attachment_type=allure.attachment_type.TEXT)
    with allure.step("console.login"):
        pass


def test_rig_failure():
    with allure.step("{STEP}"):
        raise RuntimeError("[infrastructure] [usbboot.rom] the ROM did not appear on port 1-1.3")


def test_module_failure():
    assert False, "[product] [console.login] no login prompt within 30 s"


def test_cm1_quirk():
    raise RuntimeError("[infrastructure] [usbboot.bulk] {HOST_INCOMPATIBILITY_PHRASE}: the second bulk OUT was dropped")


def test_untagged_failure():
    assert 1 == 2
'''


@pytest.fixture(scope="session")
def sample() -> SimpleNamespace:
    """What the sample tests put into their results, for the tests to look for."""
    return SimpleNamespace(expected_category=EXPECTED_CATEGORY, step=STEP, attachment=ATTACHMENT, content=CONTENT)


@pytest.fixture(scope="session")
def allure_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results of the sample tests; treat as read-only (copy it to add files)."""
    work = tmp_path_factory.mktemp("sample")
    (work / "test_sample.py").write_text(SAMPLE)
    results = work / "allure-results"
    # Entry-point plugins (the project's own among them) stay out: only allure-pytest writes these results.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "allure_pytest.plugin"]
    done = subprocess.run(
        [*command, "--alluredir", str(results), "test_sample.py"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "4 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    return results


@pytest.fixture(scope="session")
def served_report(allure_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default report (``index.html`` and the folders it loads), which needs an HTTP server."""
    return render_report(allure_results, tmp_path_factory.mktemp("served") / "report")


@pytest.fixture(scope="session")
def single_file_report(allure_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_report(allure_results, tmp_path_factory.mktemp("single") / "report", single_file=True)
