"""``hil flash`` as CI and machines see it: progress lines on a pipe while the write runs, JSON events with
``--json``, the total time and the image's SHA-256 in the summary, and ``--expect-sha256`` refusing a different
image before the rig is touched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hil.image.build import BuiltImage, ImageSpec, build_image
from tests.hilrun import hil, hil_command
from tests.rigfiles import virtual_rig_toml

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("umockdev-wrapper") is None,
                                reason="the virtual rig's eMMC needs root and umockdev (run ./setup.sh)")

PORT = "53-1.2"  # a bus no other test file uses
SLOW = {"write_mbps": 0.25, "read_mbps": 0}  # 800 KiB mapped: the write lasts seconds: progress has time to show


def rig_file(tmp_path: Path, label: str) -> Path:
    name = f"progress-{label}-{os.getpid()}"
    path = tmp_path / f"{name}.toml"
    path.write_text(virtual_rig_toml(name, "cm4", PORT, state_dir=tmp_path / f"state-{label}", emmc="256MiB",
                                     power_gpio=5, boot_gpio=6, nwp_gpio=None, off_time=0.05,
                                     timeouts={"rom": 10, "mass_storage": 20}, emmc_speed=SLOW))
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_image(tmp_path_factory.mktemp("img") / "progress.img", ImageSpec(model="cm4", size=112 * 2**20,
                                                                                  boot_size=40 * 2**20))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_piped_flash_prints_progress_lines_while_it_writes(tmp_path: Path, image: BuiltImage) -> None:
    argv, env = hil_command("flash", str(image.path), "--rig", str(rig_file(tmp_path, "piped")),
                            "--progress-every", "0.5", "--expect-sha256", sha256(image.path).upper())
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    seen_running: list[str] = []
    deadline = time.monotonic() + 180
    try:
        for line in proc.stderr:  # a pipe, not a terminal: whole lines, flushed as they are made
            if line.startswith("write ") and "MB/s" in line and proc.poll() is None:
                seen_running.append(line)
            if len(seen_running) >= 2 or time.monotonic() > deadline:
                break
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(seen_running) >= 2, f"progress lines read while hil ran: {seen_running}\n{err[-3000:]}"
    assert "\r" not in "".join(seen_running) and "left" in "".join(seen_running)  # no bar redraws, an ETA
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert f"image sha256 {sha256(image.path)}" in out and "total   " in out


def test_json_events_end_the_write_at_every_mapped_byte(tmp_path: Path, image: BuiltImage) -> None:
    done = hil("flash", str(image.path), "--rig", str(rig_file(tmp_path, "json")), "--json",
               "--progress-every", "0.5", timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds nothing else
    writes = [e for e in events if e["event"] == "progress" and e["phase"] == "write"]
    result = events[-1]
    assert result["event"] == "result" and result["sha256"] == sha256(image.path)
    assert len(writes) >= 2 and writes[-1]["bytes"] == writes[-1]["total"] == result["bytes_written"]
    assert writes[-1]["fraction"] == 1.0 and all(e["eta_seconds"] is not None for e in writes[1:])
    stages = {(e["stage"], e["status"]) for e in events if e["event"] == "stage"}
    assert {("usbboot", "passed"), ("flash.write", "passed"), ("flash.verify", "passed")} <= stages
    assert "identical" in done.stderr  # the readable summary moved to stderr


def test_a_different_image_is_refused_before_the_rig_is_touched(tmp_path: Path, image: BuiltImage) -> None:
    started = time.monotonic()
    wrong = hil("flash", str(image.path), "--rig", str(rig_file(tmp_path, "wrong")), "--expect-sha256", "0" * 64)
    assert wrong.returncode == 2, wrong.stderr
    assert "nothing was written" in wrong.stderr and sha256(image.path) in wrong.stderr
    assert "disk " not in wrong.stdout and time.monotonic() - started < 30  # no USB boot, no disk found
    bad = hil("flash", str(image.path), "--rig", str(rig_file(tmp_path, "bad")), "--expect-sha256", "abc")
    assert bad.returncode == 2 and "64 hex digits" in bad.stderr
