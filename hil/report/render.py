"""Render an allure-results folder to an HTML report that opens in a lab with no way out.

The pinned Allure Report 3 (``report/package.json``, installed with ``npm ci --prefix report``) does the
rendering; this module only runs it and makes the page safe offline. Allure 3.18 hard-codes a Google
Analytics loader into every ``index.html`` with no option to turn it off, so the tag is cut out of the page
afterwards, and any other outside reference left in it fails the render instead of shipping a report that
phones home or hangs on a closed network.
"""

from __future__ import annotations

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
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# The loader (<script async src="https://www.googletagmanager.com/...">) and the inline gtag() set-up after it.
_ANALYTICS = re.compile(
    r"\s*<script\b[^>]*\bsrc=\"https://www\.googletagmanager\.com/[^\"]*\"[^>]*>\s*</script>"
    r"|\s*<script>[^<]*?\bgtag\([^<]*</script>"
)


def render_report(results: Path, out: Path, *, single_file: bool = False, name: str = "cm-hil") -> Path:
    """Render ``results`` into ``out`` (replacing a report already there) and return its ``index.html``.

    ``single_file`` inlines scripts and data into ``index.html`` so that it opens straight from disk
    (``file://``); the default layout needs an HTTP server, as browsers refuse ``fetch`` over ``file://``.
    """
    if not results.is_dir():
        raise InputError(
            f"{results}: no allure-results folder there. Fix: run pytest with --alluredir {results} first",
            stage="report",
        )
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
        command = [str(ALLURE), "awesome", "--config", str(ALLURE_CONFIG), "--report-name", name]
        command += ["--output", str(staging), *(["--single-file"] if single_file else []), str(results.resolve())]
        _run_allure(command, results)
        index = staging / "index.html"
        if not index.is_file():
            raise InfrastructureError(f"allure exited 0 but wrote no {index.name} for {results}", stage="report")
        html = _ANALYTICS.sub("", index.read_text(encoding="utf-8"))
        outside = _outside_references(html)
        if outside:
            raise InfrastructureError(
                f"the report for {results} would load {', '.join(sorted(outside))} from outside the machine: the "
                f"pinned allure changed its page. Fix: extend the clean-up in {__name__} for this allure version",
                stage="report",
            )
        index.write_text(html, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out / "index.html"


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


def _run_allure(command: list[str], results: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"}
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
        raise InfrastructureError(
            f"allure failed to render {results} (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}",
            stage="report",
            stderr=done.stderr,
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
