"""``hil lab run``: the nightly on every matching place, on its controller, into one report. The second
controller is "another host" reached through stand-ins for ssh and scp that log each call and run it here, so
the commands, the image's single trip and the results' way back are checked without an SSH server."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.hilrun import hil

SSH = """#!/bin/sh
echo "ssh $*" >> "$STANDIN_LOG"
while [ $# -gt 0 ]; do case "$1" in -o) shift 2;; -*) shift;; *) break;; esac; done
shift
[ "$1" = "--" ] && shift
exec sh -c "$*"
"""
SCP = """#!/bin/sh
echo "scp $*" >> "$STANDIN_LOG"
while [ $# -gt 0 ]; do case "$1" in -o) shift 2;; -*) shift;; *) break;; esac; done
src="${1#*.test:}"; dst="${2#*.test:}"
exec cp -r "$src" "$dst"
"""


@pytest.fixture
def standins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ssh and scp stand-ins first on PATH (for this process and the hil it starts); returns their log."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("ssh", SSH), ("scp", SCP)):
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    log = tmp_path / "standin.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_LOG", str(log))
    return log


def test_lab_run_runs_each_place_on_its_controller_into_one_report(serve, lab_rig, coordinator: str,  # type: ignore[no-untyped-def]
                                                                   standins: Path, tmp_path: Path) -> None:
    serve("ctl-1", [lab_rig("lab-a", "20-1", tags={"carrier": "cm4io"})], site="room-1")
    serve("ctl-2", [lab_rig("lab-b", "21-1", tags={"carrier": "cm4io"})], site="room-2", host="ctl-2.test")
    image = tmp_path / "test.img"
    image.write_bytes(os.urandom(1 << 20))
    report = tmp_path / "reports" / "run-1"
    run = hil("lab", "run", "--coordinator", coordinator, "carrier=cm4io", "--report-dir", str(report),
              "--image", f"cm4={image}", "--pytest-args", "-k",
              "test_power_switch_toggles or test_boot_mode_line_toggles", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

    labels = []
    for path in report.glob("*/*/allure-results/*-result.json"):
        data = json.loads(path.read_text())
        assert data["status"] == "passed"
        labels.append({label["name"]: label["value"] for label in data["labels"]})
    assert len(labels) == 4  # two tests on each rig, ctl-2's fetched back from "the other host"
    assert {(x["rig"], x["controller"], x["site"]) for x in labels} == {("lab-a", "ctl-1", "room-1"),
                                                                         ("lab-b", "ctl-2", "room-2")}
    index = report / "html" / "index.html"
    assert index.is_file() and "ctl-1" in index.read_text() and "ctl-2" in index.read_text()
    assert (report.parent / "history.jsonl").read_text().strip()  # the next run's report shows this one

    calls = standins.read_text().splitlines()
    nightly = [c for c in calls if " nightly " in c]
    assert len(nightly) == 1 and "ctl-2.test" in nightly[0] and "lab-b.toml" in nightly[0]  # ctl-1 ran here
    assert "HIL_HOLDER=" in nightly[0]  # the place is held in this job's name there too
    copies = [c for c in calls if c.startswith("scp") and str(image) in c]
    assert len(copies) == 1 and "ctl-2.test:" in copies[0]
    cached = list((tmp_path / "reports-ctl-2" / "lab-images").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == image.read_bytes()


def test_an_image_travels_once_per_controller(standins: Path, tmp_path: Path) -> None:
    from hil.lab.controllers import Controller

    controller = Controller("ctl-9", "ctl-9.test", "/usr/bin/python3", str(tmp_path), str(tmp_path / "reports"))
    image = tmp_path / "a.img"
    image.write_bytes(b"x" * 4096)
    first = controller.put_image(image)
    assert Path(first).read_bytes() == image.read_bytes() and first.startswith(controller.cache)
    assert controller.put_image(image) == first
    assert sum(1 for c in standins.read_text().splitlines() if c.startswith("scp")) == 1
    here = Controller("ctl-0", "localhost", "/usr/bin/python3", str(tmp_path), str(tmp_path / "reports"))
    assert here.put_image(image) == str(image.resolve())  # on this host the image is used where it is
