"""Power backends, the boot-mode order, the per-rig lock, and recovery from a holder that died."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hil.cli import main
from hil.control.lifecycle import Lifecycle, ModuleState, StateFile
from hil.control.power import UhubctlPower
from hil.errors import InfrastructureError
from hil.rig import Rig, load_rig

CHILD = """
import sys, time
from hil.control.lifecycle import Lifecycle
from hil.rig import load_rig
with Lifecycle(load_rig(sys.argv[1], check_devices=False)) as lc:
    lc.power_on()
    print("powered", flush=True)
    time.sleep(30)
"""


@pytest.fixture
def command_rig(tmp_path: Path) -> Callable[..., Rig]:
    """A real-hardware rig whose supply is a file switched by shell commands (it outlives any process)."""

    def make(name: str = "rc-cmd", status: bool = True) -> Rig:
        supply = tmp_path / f"{name}.supply"
        supply.write_text("off\n")
        log = tmp_path / f"{name}.log"
        switch = 'echo {0} > {1}; echo "{0} $(date +%s.%N)" >> {2}'
        status_line = f'status = ["cat", "{supply}"]' if status else ""
        path = tmp_path / f"{name}.toml"
        path.write_text(f"""
name = "{name}"
model = "cm4"
[emmc]
size = "32GB"
[power]
backend = "command"
on = ["sh", "-c", '{switch.format("on", supply, log)}']
off = ["sh", "-c", '{switch.format("off", supply, log)}']
{status_line}
[relays]
pin_factory = "mock"
off_time = 0.3
[relays.nrpi_boot]
gpio = 5
[usb]
port = "1-1.7"
[console]
device = "/dev/null"
""")
        return load_rig(path)

    return make


def supply(rig: Rig) -> str:
    return (rig.path.parent / f"{rig.name}.supply").read_text().strip()


def switch_times(rig: Rig) -> list[tuple[str, float]]:
    lines = (rig.path.parent / f"{rig.name}.log").read_text().split("\n")
    return [(w, float(t)) for w, t in (line.split() for line in lines if line)]


def start_child(rig: Rig) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(rig.path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "powered\n"
    return child


def test_module_left_powered_by_sigkill_is_powered_off_at_next_start(command_rig: Callable[..., Rig]) -> None:
    rig = command_rig()
    child = start_child(rig)
    child.kill()
    child.wait()
    assert supply(rig) == "on" and StateFile(rig).read()["relays_on"] is True
    with Lifecycle(rig) as lc:
        assert supply(rig) == "off" and lc.state is ModuleState.OFF
        assert lc.recovered is not None and f"pid {child.pid}" in lc.recovered
    assert StateFile(rig).read()["relays_on"] is False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_unwind_to_a_safe_rig(command_rig: Callable[..., Rig], signum: int) -> None:
    rig = command_rig()
    child = start_child(rig)
    child.send_signal(signum)
    code = child.wait(timeout=10)
    assert code in (128 + signum, -signum), code
    assert supply(rig) == "off" and StateFile(rig).read()["relays_on"] is False
    with Lifecycle(rig) as lc:
        assert lc.recovered is None


def test_one_rig_one_holder(command_rig: Callable[..., Rig]) -> None:
    rig = command_rig()
    with Lifecycle(rig):
        with pytest.raises(InfrastructureError) as info, Lifecycle(rig):
            pass
        assert info.value.stage == "lifecycle.lock" and f"pid {os.getpid()}" in str(info.value)
    with Lifecycle(rig) as lc:
        assert lc.state is ModuleState.OFF


def test_off_time_is_enforced_between_off_and_on(command_rig: Callable[..., Rig]) -> None:
    rig = command_rig()
    with Lifecycle(rig) as lc:
        lc.power_on()
        lc.off()
        lc.power_on()
    events = switch_times(rig)
    offs = [t for w, t in events if w == "off"]
    ons = [t for w, t in events if w == "on"]
    assert len(ons) == 2 and ons[1] - max(t for t in offs if t < ons[1]) >= rig.relays.off_time


def test_command_without_status_reports_what_it_set(command_rig: Callable[..., Rig]) -> None:
    rig = command_rig(status=False)
    with Lifecycle(rig) as lc:
        assert lc.power.read() is None and not lc.power.is_on
        lc.power_on()
        assert lc.power.is_on and supply(rig) == "on"


def test_leave_powered_is_recorded_and_corrected_next_time(command_rig: Callable[..., Rig],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rig = command_rig()
    assert main(["power", "on", "--rig", str(rig.path)]) == 0
    assert supply(rig) == "on" and StateFile(rig).read()["kept"] is True
    assert main(["power", "off", "--rig", str(rig.path)]) == 0
    assert supply(rig) == "off" and "left powered in state powered by `hil power on`" in capsys.readouterr().err


FAKE_UHUBCTL = """#!/bin/sh
# uhubctl stand-in: -l HUB -p PORT [-a on|off]; state in $0.state; STUCK=1 ignores -a off
state="$0.state"; [ -f "$state" ] || echo 0503 > "$state"
while [ $# -gt 0 ]; do case "$1" in -a) action="$2"; shift;; esac; shift; done
case "$action" in on) echo 0503 > "$state";; off) [ -n "$STUCK" ] || echo 0000 > "$state";; esac
word=power; [ "$(cat "$state")" = 0000 ] && word=off
echo "Current status for hub 1-1 [2109:3431 USB2.0 Hub, USB 2.10, 4 ports, ppps]"
echo "  Port 2: $(cat "$state") $word"
"""


@pytest.mark.parametrize("stuck", [False, True])
def test_uhubctl_port_power_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stuck: bool) -> None:
    program = tmp_path / "uhubctl"
    program.write_text(FAKE_UHUBCTL)
    program.chmod(0o755)
    if stuck:
        monkeypatch.setenv("STUCK", "1")
    rig_file = tmp_path / "hub.toml"
    rig_file.write_text(f"""
model = "cm4"
[emmc]
size = "8GB"
[power]
backend = "uhubctl"
hub = "1-1"
port = 2
program = "{program}"
[relays]
pin_factory = "mock"
off_time = 0
[usb]
port = "1-1.2"
[console]
device = "/dev/null"
""")
    switch = UhubctlPower(load_rig(rig_file))
    assert switch.read() is True  # a hub powers its ports by default
    if stuck:
        with pytest.raises(InfrastructureError, match="reads back on after being switched off"):
            switch.off()
        return
    switch.off()
    assert switch.read() is False
    switch.on()
    assert switch.is_on


def test_boot_mode_cannot_change_under_a_powered_module(bench: Callable[..., Any]) -> None:
    b = bench("cm4")
    with b.lifecycle() as lc:
        lc.power_on()
        with pytest.raises(InfrastructureError, match="only change while the module is powered off"):
            lc.bootmode.set(usb_boot=True)
        with pytest.raises(InfrastructureError, match="only change while"):
            lc.bootmode.set(write_protect=True)
        with pytest.raises(InfrastructureError, match="already powered in eMMC boot mode"):
            lc.bootmode.power_on(usb_boot=True)
        assert lc.power.is_on and not lc.bootmode.usb_boot

        stop = threading.Event()

        def meddle() -> None:  # another thread keeps trying to flip nRPI_BOOT
            want = True
            while not stop.is_set():
                with contextlib.suppress(InfrastructureError):
                    lc.bootmode.set(usb_boot=want)
                want = not want

        meddler = threading.Thread(target=meddle)
        meddler.start()
        try:
            for _ in range(4):
                lc.off()
                lc.bootmode.power_on(usb_boot=False)
                time.sleep(0.05)
        finally:
            stop.set()
            meddler.join()
    energised = False
    for event in b.vrig.journal.events("relay"):
        if event.what == "power":
            energised = event.details["energised"]
        else:
            assert not energised, f"{event.what} changed while the module was powered"
    ons = [e.details["usb_boot"] for e in b.vrig.journal.events("power") if e.what == "on"]
    assert len(ons) == 5 and not any(ons)


def test_hil_boot_command_proves_the_build(make_rig: Callable[..., Rig], bench: Callable[..., Any],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rig = make_rig("cm5", name="rc-cli")
    assert rig.virtual is not None
    image = bench("cm5").image("cli-7")
    rig.virtual.state_dir.mkdir(parents=True, exist_ok=True)
    (rig.virtual.state_dir / "emmc.img").write_bytes(image.path.read_bytes())
    assert main(["boot", "--rig", str(rig.path), "--expect-build-id", "cli-7", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["build_id"] == "cli-7" and set(record["markers"]) >= {"bootloader", "kernel", "login"}
    assert main(["boot", "--rig", str(rig.path), "--expect-build-id", "cli-8"]) == 4
    assert "[boot.build-id]" in capsys.readouterr().err
