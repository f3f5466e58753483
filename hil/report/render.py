"""Render an allure-results folder to an HTML report that opens in a lab with no way out.

The pinned Allure Report 3 (``report/package.json``, installed with ``npm ci --prefix report``) does the
rendering (``allure generate`` with the Awesome plugin's options in ``report/allurerc.json``: the tree grouped by
rig and suite and sorted by name, so rigs come in the same order every night); this module only runs it and
tidies two things afterwards. Allure 3.18 hard-codes a Google Analytics loader into every ``index.html`` with no
option to turn it off, so the tag is cut out of the page, and any other outside reference left in it fails the
render instead of shipping a report that phones home or hangs on a closed network. And its timeline lays out
hosts and lanes in the order it happened to read the result files (random file names), so the timeline's data
is sorted by host, lane (the rig, see hil.fixtures.report_tidy) and start.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

from hil.errors import InfrastructureError, InputError

TOOLCHAIN = Path(__file__).resolve().parents[2] / "report"
ALLURE_CONFIG = TOOLCHAIN / "allurerc.json"
ALLURE = TOOLCHAIN / "node_modules" / ".bin" / "allure"
RENDER_TIMEOUT_S = 180.0
HISTORY_LIMIT = 30  # runs kept in a history file, oldest dropped first
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# The loader (<script async src="https://www.googletagmanager.com/...">) and the inline gtag() set-up after it.
_ANALYTICS = re.compile(
    r"\s*<script\b[^>]*\bsrc=\"https://www\.googletagmanager\.com/[^\"]*\"[^>]*>\s*</script>"
    r"|\s*<script>[^<]*?\bgtag\([^<]*</script>"
)
TIMELINE = "widgets/timeline.json"
# A single-file report carries each data file inline as d("widgets/timeline.json","<base64>").
_INLINE_TIMELINE = re.compile(r'\bd\("' + re.escape(TIMELINE) + r'","([A-Za-z0-9+/=]*)"\)')


def render_report(results: Path | list[Path], out: Path, *, single_file: bool = False, name: str = "cm-hil",
                  history: Path | None = None, history_limit: int = HISTORY_LIMIT) -> Path:
    """Render ``results`` (one allure-results folder or several, merged) into ``out``, replacing a report
    already there, and return its ``index.html``.

    ``single_file`` inlines scripts and data into ``index.html`` so that it opens straight from disk
    (``file://``); the default layout needs an HTTP server, as browsers refuse ``fetch`` over ``file://``.
    ``history``: Allure 3's history file (JSON lines, one per run): the report shows the runs in it (trend,
    each test's history) and this run is appended, keeping the newest ``history_limit``.
    """
    folders = [results] if isinstance(results, Path) else list(results)
    for folder in folders:
        if not folder.is_dir():
            raise InputError(
                f"{folder}: no allure-results folder there. Fix: run pytest with --alluredir {folder} first",
                stage="report",
            )
    if not folders:
        raise InputError("no allure-results folder given", stage="report")
    if history_limit < 1:
        raise InputError(f"a history of {history_limit} runs keeps nothing. Fix: give 1 or more", stage="report")
    _check_replaceable(out)
    if not ALLURE.exists():
        raise InfrastructureError(
            f"{ALLURE} is missing: the report toolchain is not installed. Fix: run `npm ci --prefix {TOOLCHAIN}`",
            stage="report",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Allure 3 does not clear its output folder and fails to lay a second report over a first one, so each
    # render goes to a fresh folder beside ``out`` and is moved into place once it is known to be good.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staging = Path(tmp) / "report"
        config = _config(Path(tmp), history, history_limit, single_file=single_file)
        command = [str(ALLURE), "generate", "--config", str(config), "--report-name", name]
        command += ["--output", str(staging), *(str(f.resolve()) for f in folders)]
        _run_allure(command, folders[0], home=Path(tmp))
        index = staging / "index.html"
        if not index.is_file():
            raise InfrastructureError(f"allure exited 0 but wrote no {index.name} for {folders[0]}", stage="report")
        html = _sort_timeline(staging, _ANALYTICS.sub("", index.read_text(encoding="utf-8")))
        outside = _outside_references(html)
        if outside:
            raise InfrastructureError(
                f"the report for {folders[0]} would load {', '.join(sorted(outside))} from outside the machine: the "
                f"pinned allure changed its page. Fix: extend the clean-up in {__name__} for this allure version",
                stage="report",
            )
        index.write_text(html, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out / "index.html"


def _config(folder: Path, history: Path | None, limit: int, *, single_file: bool) -> Path:
    """The project's Allure config, with this render's layout and where it reads and appends its history."""
    config = json.loads(ALLURE_CONFIG.read_text(encoding="utf-8"))
    awesome = config.setdefault("plugins", {}).setdefault("awesome", {})
    awesome.setdefault("options", {})["singleFile"] = single_file
    if history is not None:
        history = history.resolve()
        if history.exists() and not history.is_file():
            raise InputError(f"{history}: not a history file. Fix: give a file path (it is created if missing)",
                             stage="report")
        history.parent.mkdir(parents=True, exist_ok=True)
        config.update(historyPath=str(history), historyLimit=limit, appendHistory=True)
    path = folder / "allurerc.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _sort_timeline(report: Path, html: str) -> str:
    """The timeline's entries in (host, lane, start) order, in ``report``'s data file or inlined in ``html``."""

    def by_lane(data: bytes) -> bytes:
        entries = json.loads(data)
        entries.sort(key=lambda e: (str(e.get("host", "")), str(e.get("thread", "")), e.get("start") or 0))
        return json.dumps(entries).encode()

    widget = report / TIMELINE
    if widget.is_file():
        widget.write_bytes(by_lane(widget.read_bytes()))
        return html
    return _INLINE_TIMELINE.sub(
        lambda m: f'd("{TIMELINE}","{base64.b64encode(by_lane(base64.b64decode(m[1]))).decode()}")', html, count=1)


def _outside_references(html: str) -> set[str]:
    """URLs that a browser would fetch from a host other than the one serving the page."""
    finder = _ResourceFinder()
    finder.feed(html)
    finder.close()
    return {url for url in finder.urls if _is_outside(url)}


def _check_replaceable(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file()):
        raise InputError(
            f"{out}: exists and is not an earlier report, so it will not be replaced. Fix: choose a new or empty "
            "folder for the report",
            stage="report",
        )


def _run_allure(command: list[str], results: Path, *, home: Path) -> None:
    """``allure generate`` writes the cause of a failure to a log under ``$HOME/.allure/logs`` and prints only
    where it is: ``home`` (the render's private folder) keeps those logs out of the user's home, and the cause
    is read back into the error."""
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0", "HOME": str(home)}
    try:
        done = subprocess.run(
            command, cwd=TOOLCHAIN, env=env, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as timeout:
        raise InfrastructureError(
            f"allure did not finish rendering {results} within {RENDER_TIMEOUT_S:.0f} s",
            stage="report",
            stderr=_text(timeout.stderr),
        ) from timeout
    except OSError as error:
        raise InfrastructureError(
            f"cannot run {command[0]}: {error}. Fix: install Node.js 20 or newer, then `npm ci --prefix {TOOLCHAIN}`",
            stage="report",
        ) from error
    if done.returncode != 0:
        logged = "".join(log.read_text(errors="replace") for log in sorted(home.glob(".allure/logs/*.log")))
        causes = [line.split("[ERROR] ", 1)[1] for line in logged.splitlines() if "[ERROR] " in line]
        said = done.stderr.strip() or done.stdout.strip()
        raise InfrastructureError(
            f"allure failed to render {results} (exit {done.returncode}): {'; '.join(causes) or said}",
            stage="report",
            stderr=done.stderr + logged,
        )


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _is_outside(url: str) -> bool:
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https", "") or not parts.netloc:
        return False  # data:, blob:, relative paths and the like stay on the page's own host
    return (parts.hostname or "") not in _LOOPBACK_HOSTS


class _ResourceFinder(HTMLParser):
    """Collects what the page fetches by itself: every ``src``, and ``href`` on ``<link>``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and (key == "src" or (key == "href" and tag == "link")):
                self.urls.append(value)
