"""``hil virtual run`` leaves the rig safe however PROGRAM ends, because the rig's Lifecycle drives it.

Each run is a process of its own, so the relays it drove vanish with it; what outlives it is the Lifecycle's
state file, written "off" only once power is cut, nRPI_BOOT released and EEPROM_nWP back at rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hil.rig import runtime_dir
from tests.hilrun import hil, hil_command
from tests.rigfiles import virtual_rig_toml

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("umockdev-wrapper") is None,
                                reason="the virtual rig's eMMC needs root and umockdev (run ./setup.sh)")


def rig_file(tmp_path: Path, label: str, *, boot_gpio: int | None = 13) -> tuple[Path, str]:
    name = f"safety-{label}-{os.getpid()}"
    path = tmp_path / f"{name}.toml"
    path.write_text(virtual_rig_toml(name, "cm4", "3-2", power_gpio=12, boot_gpio=boot_gpio, nwp_gpio=16))
    return path, name


def state_file(name: str) -> Path:
    return runtime_dir() / name / "state.json"


def left_safe(name: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(state_file(name).read_text())
    assert (state["relays_on"], state["state"], state["kept"]) == (False, "off", False), state
    return state


@pytest.mark.skipif(shutil.which("lsusb") is None, reason="usbutils is installed by ./setup.sh")
def test_program_starts_with_the_rom_on_the_port_and_its_failure_leaves_the_rig_safe(tmp_path: Path) -> None:
    rig, name = rig_file(tmp_path, "fail")
    state_file(name).parent.mkdir(parents=True, exist_ok=True)
    state_file(name).write_text(json.dumps({"relays_on": True, "state": "usb-boot", "pid": 1, "argv": ["killed"]}))
    done = hil("virtual", "run", "--rig", str(rig), "--", "sh", "-c", "lsusb -d 0a5c:2711 || exit 9; exit 5")
    assert done.returncode == 5, done.stderr  # no wait in PROGRAM: the ROM was there when it started
    assert "was left powered in state usb-boot" in done.stderr  # the killed holder's relays, switched off
    stages = done.stderr.split("stages reached")[1].split("\n")[0]
    assert stages.split(" -> ")[-2:] == ["rom", "off"], stages
    assert left_safe(name)["pid"] != 1


def test_sigterm_while_program_runs_kills_it_and_leaves_the_rig_safe(tmp_path: Path) -> None:
    rig, name = rig_file(tmp_path, "term")
    child_pid = tmp_path / "child.pid"
    argv, env = hil_command("virtual", "run", "--rig", str(rig), "--", "sh", "-c",
                            f"echo $$ > {child_pid}.new && mv {child_pid}.new {child_pid} && exec sleep 60")
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:  # not a pipe: a PROGRAM left running would hold it open
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while not child_pid.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child_pid.exists(), "PROGRAM never started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, log.read_text()
        assert "Traceback" not in log.read_text()
        assert left_safe(name)["pid"] == proc.pid
        with pytest.raises(ProcessLookupError):  # PROGRAM did not outlive the run
            os.kill(int(child_pid.read_text()), 0)
    finally:
        if child_pid.exists():  # what a failed run left running goes too
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child_pid.read_text()), signal.SIGKILL)
        proc.kill()
        proc.wait()
        if proc.returncode != 128 + signal.SIGTERM:  # a run that died uncleanly left its eMMC mounted:
            hil("virtual", "run", "--rig", str(rig), "--boot-mode", "emmc", "--", "true")  # the next removes it


def test_usb_boot_mode_needs_an_nrpi_boot_relay(tmp_path: Path) -> None:
    rig, name = rig_file(tmp_path, "nobootline", boot_gpio=None)
    done = hil("virtual", "run", "--rig", str(rig), "--", "true")
    assert done.returncode == 2, done.stderr
    assert "no nRPI_BOOT relay" in done.stderr and "Traceback" not in done.stderr
    left_safe(name)


def test_a_second_run_on_a_rig_in_use_is_refused_before_it_touches_the_module(tmp_path: Path) -> None:
    """The rig lock comes first: a second command must not repoint the running module's console or open its eMMC."""
    rig, name = rig_file(tmp_path, "busy")
    started = tmp_path / "started"
    argv, env = hil_command("virtual", "run", "--rig", str(rig), "--boot-mode", "emmc", "--", "sh", "-c",
                            f"touch {started} && exec sleep 30")
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:
        first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), log.read_text()
        console = runtime_dir() / name / "console"
        before = os.readlink(console) if console.is_symlink() else None
        second = hil("virtual", "run", "--rig", str(rig), "--", "true")
        assert second.returncode == 3, second.stderr
        assert f"rig {name} is in use by pid {first.pid}" in second.stderr
        assert "stages reached" not in second.stderr  # no virtual module came up in the second process
        assert (os.readlink(console) if console.is_symlink() else None) == before
        assert first.poll() is None  # the running one is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, log.read_text()
    left_safe(name)
