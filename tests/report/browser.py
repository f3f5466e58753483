"""A rendered report as a person sees it in headless Chromium (Debian's), with the lab's network closed: the
report behind a loopback HTTP server, and report_check.mjs walking it stop by stop."""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hil.hostenv import outside_umockdev

CHROMIUM = Path("/usr/bin/chromium")
CHECK = Path(__file__).with_name("report_check.mjs")
NODE_MODULES = Path(__file__).resolve().parents[2] / "report" / "node_modules"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(index: Path) -> Iterator[str]:
    """A rendered report behind a static HTTP server on a free loopback port; yields the page's URL."""
    handler = functools.partial(_QuietHandler, directory=str(index.parent))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/{index.name}"
        finally:
            server.shutdown()
            thread.join()


def stop(name: str, expect: str, *, goto: str | None = None, click: tuple[str | dict[str, str], ...] = ()
         ) -> dict[str, Any]:
    """One stop of a walk: load ``goto`` (optional), click each of ``click`` (a whole text, or ``{"regex": ...}``),
    then wait for ``expect`` to show."""
    return {"name": name, "goto": goto, "click": list(click), "expect": expect}


def tab(label: str) -> dict[str, str]:
    """A tab of the page, whose text is its label and a count ("Attachments 3")."""
    return {"regex": rf"^{label}\s*\d*$"}


def look_at(stops: list[dict[str, Any]]) -> dict[str, Any]:
    """Walk the stops in one browser; returns ``{"outside": [...], "errors": [...], "stops": {name: page text}}``."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing. Fix: apt-get install chromium")
    if not (NODE_MODULES / "playwright-core").is_dir():
        pytest.fail(f"{NODE_MODULES}/playwright-core is missing. Fix: npm ci --prefix {NODE_MODULES.parent}")
    # The browser is a host program: outside umockdev's hooks (pytest runs under umockdev-wrapper, and a browser that
    # watches udev inside the virtual rig's testbed races its uevents).
    # A browser that crashed (seen once in a few full runs on a loaded machine, not reproduced alone) is looked at
    # once more; what the report shows is judged only from a browser that stayed up, and a second crash fails.
    for attempt in (1, 2):
        done = subprocess.run(["node", str(CHECK), json.dumps({"stops": stops})], capture_output=True, text=True,
                              timeout=240, check=False, env=outside_umockdev())
        crashed = "went away" in done.stdout + done.stderr or "has been closed" in done.stderr
        if done.returncode == 0 and not crashed:
            return dict(json.loads(done.stdout))
        if attempt == 2 or not crashed:
            break
        print(f"the browser crashed; looking again: {done.stderr[-2000:]}")
    raise AssertionError(done.stderr or done.stdout)


def page_id(report: Path, name: str) -> str:
    """The id of the test called ``name`` in a rendered (served) report, read from the data files its page loads:
    the test's own page is ``index.html#<id>``, whatever the tree groups it under."""
    for path in (report.parent / "data" / "test-results").glob("*.json"):
        result = json.loads(path.read_text())
        if result["name"] == name:
            return str(result["id"])
    raise AssertionError(f"no test {name!r} in the report {report}")
