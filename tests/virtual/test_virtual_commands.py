"""``hil virtual run`` and ``hil virtual selftest``, as a user runs them: separate processes, real programs."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.hilrun import hil
from tests.rigfiles import virtual_rig_toml

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("umockdev-wrapper") is None,
                                reason="the virtual rig's eMMC needs root and umockdev (run ./setup.sh)")


def rig_file(tmp_path: Path, model: str) -> Path:
    path = tmp_path / f"virtual-{model}.toml"
    path.write_text(virtual_rig_toml(f"cmd-{model}-{os.getpid()}", model, "3-1.2", emmc="256MiB", power_gpio=5,
                                     boot_gpio=6, nwp_gpio=None))
    return path


@pytest.mark.skipif(shutil.which("lsusb") is None, reason="usbutils is installed by ./setup.sh")
def test_run_a_program_that_is_not_python(tmp_path: Path) -> None:
    rig = rig_file(tmp_path, "cm4")
    script = 'sleep 0.3; lsusb -d 0a5c:2711; lsusb -t; test -e "$(dirname "$1")"'
    done = hil("virtual", "run", "--rig", str(rig), "--", "sh", "-c", script, "sh", str(rig))
    assert done.returncode == 0, done.stderr
    assert re.search(r"ID 0a5c:2711 .*BCM2711 Boot", done.stdout), done.stdout
    assert "Port 2" in done.stdout  # the ROM sits at port 3-1.2, under hub 3-1
    assert "stages reached" in done.stderr and "rom" in done.stderr
    assert "final state" in done.stderr
    program_said = done.stderr.split("stages reached")[0]
    assert "rx_lanes" not in program_said and "tx_lanes" not in program_said, program_said


def test_run_passes_the_program_exit_code_and_emmc_mode(tmp_path: Path) -> None:
    rig = rig_file(tmp_path, "cm3")
    done = hil("virtual", "run", "--rig", str(rig), "--boot-mode", "emmc", "--", "sh", "-c", "exit 7")
    assert done.returncode == 7, done.stderr
    assert "emmc boot" in done.stderr and "rom" not in done.stderr.split("stages reached")[1].split("\n")[0]


def test_run_refuses_real_rig_and_missing_program(repo: Path) -> None:
    real = hil("virtual", "run", "--rig", str(repo / "rigs" / "example-cm4-io-board.toml"), "--", "true")
    assert real.returncode == 2 and "Traceback" not in real.stderr
    none = hil("virtual", "run", "--rig", str(repo / "rigs" / "virtual-cm4.toml"))
    assert none.returncode == 2 and "no PROGRAM" in none.stderr


@pytest.mark.parametrize("model", ["cm1", "cm5"])
def test_selftest_boots_the_image_and_finds_the_rom(tmp_path: Path, model: str) -> None:
    done = hil("virtual", "selftest", "--rig", str(rig_file(tmp_path, model)))
    assert done.returncode == 0, done.stderr
    assert "read build-id" in done.stderr and "passed" in done.stderr
    assert "ROM on USB port" in done.stderr
