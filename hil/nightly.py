"""The nightly job: run the rig suites on every rig given, then render the Allure report that people read
in the morning.

pytest runs in a child process (under ``umockdev-wrapper`` when a rig is virtual, so that the virtual
modules' USB devices reach libusb), with one xdist worker per rig when there are several. Its results land in
the report folder next to the rendered HTML: ``allure-results/``, ``junit.xml`` and ``html/``. The exit status
is the worst fault among the failures (4 module or image, 3 rig or host, 2 input), 0 when all passed, so a
scheduler can tell "the product regressed" from "the lab needs a look".
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import ExitCode, Fault, HilError, InfrastructureError, InputError
from hil.hostenv import outside_umockdev
from hil.report import render_report
from hil.report.render import HISTORY_LIMIT
from hil.rig import Rig, load_rig

REPO = Path(__file__).resolve().parent.parent
SUITES = REPO / "suites"
REPORTS = REPO / "reports"
HISTORY_FILE = "history.jsonl"
TEST_TIMEOUT_S = 3 * 3600  # per test, above every stage timeout: only a hung test reaches it
_TAG = re.compile(r"^(?:[\w.]+: )?\[(infrastructure|product|input)\]")


def suite_titles(folder: Path = SUITES) -> dict[str, str]:
    """Each suite file in ``folder`` and its title (its docstring up to the first colon), read without importing
    it: what ``hil nightly --help`` says will run, so the help cannot fall behind the folder."""
    titles = {}
    for path in sorted(folder.glob("test_*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        except (OSError, SyntaxError, UnicodeDecodeError):
            doc = ""
        first = " ".join(doc.split("\n\n", 1)[0].split())
        titles[path.name] = first.split(": ", 1)[0].rstrip(".") or "(no description)"
    return titles
_PYTEST_EXIT = {2: ExitCode.INFRASTRUCTURE, 3: ExitCode.INFRASTRUCTURE, 4: ExitCode.INPUT, 5: ExitCode.INPUT}


@dataclass
class Outcome:
    """What the results say: counts by status and rig, and each failure's fault."""

    statuses: Counter[str] = field(default_factory=Counter)
    by_rig: dict[str, Counter[str]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        return max((HilError("", fault=f).exit_code for f in self.faults), default=ExitCode.OK)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items())) or "no results"
        lines = [f"tests: {counts}"]
        for rig, statuses in sorted(self.by_rig.items()):
            lines.append(f"  {rig}: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
        if self.faults:
            lines.append("failures: " + ", ".join(f"{n} {f.value}" for f, n in Counter(self.faults).items()))
        return "\n".join(lines)


def fault_of(message: str, *, failed: bool) -> Fault:
    """Whose fault a failure message names; untagged, an assertion (``failed``) blames the module and
    anything else (a crash of the test's own code) the infrastructure."""
    m = _TAG.match(message)
    if m:
        return Fault(m.group(1))
    return Fault.PRODUCT if failed else Fault.INFRASTRUCTURE


def read_outcome(results: Path) -> Outcome:
    outcome = Outcome()
    for path in sorted(results.glob("*-result.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        status = data.get("status", "unknown")
        rig = next((label["value"] for label in data.get("labels", []) if label.get("name") == "rig"), "(no rig)")
        outcome.statuses[status] += 1
        outcome.by_rig.setdefault(rig, Counter())[status] += 1
        if status in ("failed", "broken"):
            message = (data.get("statusDetails") or {}).get("message") or ""
            outcome.faults.append(fault_of(message, failed=status == "failed"))
    return outcome


@dataclass
class NightlyResult:
    report: Path  # the report folder: allure-results/, junit.xml, html/
    index: Path | None  # html/index.html, if rendered
    outcome: Outcome
    pytest_status: int
    seconds: dict[str, float]
    exit_code: ExitCode


def load_rigs(paths: list[str]) -> list[Rig]:
    rigs = [load_rig(p) for p in paths]
    names = Counter(r.name for r in rigs)
    twins = [n for n, count in names.items() if count > 1]
    if twins:
        raise InputError(f"several --rig files are called {', '.join(twins)}. Fix: give each rig its own name",
                         stage="nightly")
    return rigs


def pytest_command(rigs: list[Rig], *, results: Path, junit: Path, images: list[str], payloads: list[str],
                   extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "pytest", str(SUITES), "--rootdir", str(REPO), "-p", "no:cacheprovider",
               "--alluredir", str(results), "--clean-alluredir", "--junitxml", str(junit),
               "-o", f"timeout={TEST_TIMEOUT_S}", "-o", "junit_family=xunit2"]
    for rig in rigs:
        command += ["--rig", str(rig.path)]
    for image in images:
        command += ["--image", image]
    for payload in payloads:
        command += ["--payload", payload]
    if len(rigs) > 1:
        command += ["-n", str(len(rigs)), "--dist", "loadgroup"]
    if any(r.is_virtual for r in rigs):
        wrapper = shutil.which("umockdev-wrapper")
        if wrapper is None:
            raise InfrastructureError("virtual rigs need umockdev-wrapper. Fix: run ./setup.sh (apt package umockdev)",
                                      stage="nightly")
        command = [wrapper, *command]
    return command + extra


def reports_root() -> Path:
    """Where reports, their history and the matrix history live: ``HIL_REPORTS_DIR``, default ``reports/``."""
    return Path(os.environ.get("HIL_REPORTS_DIR") or REPORTS)


def default_report_dir() -> Path:
    return reports_root() / time.strftime("%Y%m%d-%H%M%S")


def default_history() -> Path:
    """The nightly reports' shared history (Allure 3's JSON-lines file), beside the reports."""
    return reports_root() / HISTORY_FILE


def check_images_for_real_rigs(rigs: list[Rig], images: list[str]) -> None:
    """A real rig needs a real image: the test image built here is a stand-in no firmware can boot, and its
    failure would be blamed on the module. Refused before anything is touched (InputError)."""
    given = {i.split("=", 1)[0] if "=" in i.split("/")[0] else "" for i in images}
    for rig in rigs:
        if rig.virtual is None and "" not in given and rig.model.name not in given:
            raise InputError(f"rig {rig.name} is a real rig and no image is given for its {rig.model.name}: the "
                             "stand-in test image has no firmware or kernel a real module can boot. Fix: pass --image "
                             f"IMAGE (or --image {rig.model.name}=IMAGE), e.g. a Raspberry Pi OS Lite image",
                             stage="nightly")


def run_nightly(rig_paths: list[str], *, images: list[str] | None = None, payloads: list[str] | None = None,
                report_dir: Path | None = None, single_file: bool = False,
                extra: list[str] | None = None, history: Path | None = None,
                history_limit: int = HISTORY_LIMIT) -> NightlyResult:
    """Run the suites on ``rig_paths`` and render the report; ``extra`` goes to pytest as is.

    ``history``: the history file the report shows and appends to (None: no history)."""
    if history_limit < 1:
        raise InputError(f"--history-limit {history_limit}: keep at least 1 run", stage="nightly")
    rigs = load_rigs(rig_paths)
    check_images_for_real_rigs(rigs, images or [])
    report = (report_dir or default_report_dir()).resolve()
    report.mkdir(parents=True, exist_ok=True)
    results, junit = report / "allure-results", report / "junit.xml"
    command = pytest_command(rigs, results=results, junit=junit, images=images or [], payloads=payloads or [],
                             extra=extra or [])
    env = outside_umockdev()
    seconds: dict[str, float] = {}
    started = time.monotonic()
    status = subprocess.run(command, cwd=REPO, env=env, check=False).returncode
    seconds["suites"] = time.monotonic() - started
    outcome = read_outcome(results) if results.is_dir() else Outcome()
    index = None
    if any(results.glob("*-result.json")):
        started = time.monotonic()
        index = render_report(results, report / "html", single_file=single_file,
                              name=f"cm-hil nightly: {', '.join(sorted(r.name for r in rigs))}",
                              history=history, history_limit=history_limit)
        seconds["report"] = time.monotonic() - started
    code = outcome.exit_code
    if status != 0 and code == ExitCode.OK:  # pytest failed without a failed test: collection, usage, crash
        code = _PYTEST_EXIT.get(status, ExitCode.INFRASTRUCTURE)
    return NightlyResult(report, index, outcome, status, seconds, code)
