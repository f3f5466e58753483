"""The rig session behind every command: a held rig refused at once with its holder named, and ``hil flash`` on rigs
powered through a uhubctl hub port or through commands (the virtual rig models both with hil-virtual-uhubctl)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.cli import main
from hil.image.build import BuiltImage, ImageSpec, build_image
from hil.rig import load_rig
from hil.session import RigSession, find_body
from tests.hilrun import hil, hil_command
from tests.rigfiles import virtual_rig_toml

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("umockdev-wrapper") is None,
                                reason="the virtual rig's eMMC needs root and umockdev (run ./setup.sh)")

PORT = "47-1.4"  # a bus no other test file of this process uses
UHUBCTL = {"power": {"backend": "uhubctl", "hub": "47-1", "port": 2, "program": "hil-virtual-uhubctl"}}
COMMAND = {"power": {"backend": "command", "on": ["hil-virtual-uhubctl", "-l", "47-1", "-p", "2", "-a", "on"],
                     "off": "hil-virtual-uhubctl -l 47-1 -p 2 -a off"}}


def rig_file(tmp_path: Path, label: str, extra: dict[str, object] | None = None) -> Path:
    """A virtual cm4 without a payload folder; with ``extra`` [power], no power relay (rig.py forbids both)."""
    name = f"session-{label}-{os.getpid()}"
    path = tmp_path / f"{name}.toml"
    path.write_text(virtual_rig_toml(name, "cm4", PORT, state_dir=tmp_path / f"state-{label}", emmc="256MiB",
                                     power_gpio=5, boot_gpio=6, nwp_gpio=None, off_time=0.05,
                                     timeouts={"rom": 10, "mass_storage": 20}, extra=extra or {}))
    if extra:  # the supply is the hub port or the commands: no [relays.power]
        text = path.read_text()
        path.write_text(re.sub(r"\[relays\.power\]\ngpio = 5\n", "", text))
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_image(tmp_path_factory.mktemp("img") / "session.img", ImageSpec(model="cm4", size=112 * 2**20,
                                                                                 boot_size=40 * 2**20))


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A rig held by `hil power on` (a relay is held only while that command runs)."""
    rig = rig_file(tmp_path, "held")
    argv, env = hil_command("power", "on", "--rig", str(rig))
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        if "powered on" in line or time.monotonic() > deadline:
            break
    try:
        yield rig, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_second_command_on_a_held_rig_is_refused_at_once_naming_the_holder(
        held: tuple[Path, subprocess.Popen[str]], image: BuiltImage, capsys: pytest.CaptureFixture[str]) -> None:
    rig, holder = held
    for argv in (["flash", str(image.path), "--rig", str(rig)], ["usbboot", "--rig", str(rig)],
                 ["boot", "--rig", str(rig)], ["eeprom", "flash", "--rig", str(rig)],
                 ["matrix", "--rig", str(rig), "--attempts", "1"]):
        started = time.monotonic()
        code = main(argv)  # in this process: the refusal itself, without an interpreter's start
        seconds = time.monotonic() - started
        err = capsys.readouterr().err
        assert code == 3, (argv, err)
        assert f"is in use by pid {holder.pid} (" in err and "power on" in err, err
        assert seconds < 1.0, (argv, seconds)
    done = hil("flash", str(image.path), "--rig", str(rig))  # and as a user starts it
    assert done.returncode == 3 and f"in use by pid {holder.pid}" in done.stderr, done.stderr
    assert holder.poll() is None  # the holder goes on


@pytest.mark.parametrize("power", [UHUBCTL, COMMAND], ids=["uhubctl", "command"])
def test_hil_flash_on_a_rig_powered_without_a_relay(tmp_path: Path, image: BuiltImage,
                                                    power: dict[str, object]) -> None:
    rig = rig_file(tmp_path, str(power["power"]["backend"]), power)  # type: ignore[index]
    assert load_rig(rig).relays.power is None
    done = hil("flash", str(image.path), "--rig", str(rig), timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "identical" in done.stdout and f"build-id {image.build_id}" in done.stdout
    booted = hil("boot", "--rig", str(rig), "--expect-build-id", image.build_id, timeout=180)
    assert booted.returncode == 0, booted.stderr[-2000:]


def test_a_wrong_hub_location_is_the_hubs_error(tmp_path: Path, image: BuiltImage) -> None:
    wrong = {"power": {**UHUBCTL["power"], "hub": "47-2"}}
    done = hil("flash", str(image.path), "--rig", str(rig_file(tmp_path, "wrong-hub", wrong)))
    assert done.returncode == 3, done.stderr
    assert "No compatible devices detected at location 47-2" in done.stderr


def test_the_library_finds_the_virtual_body_through_its_entry_point(tmp_path: Path) -> None:
    rig = load_rig(rig_file(tmp_path, "body"))
    body = find_body(rig)
    assert body is not None and type(body).__module__ == "hil.virtual.body"
    with RigSession(rig, handle_signals=False) as session:
        assert session.body is not None and session.body.rig.name == rig.name
        payload = session.payload()
        assert payload is not None and (payload / "bootfiles.bin").is_file()
    assert not payload.exists()  # the session's stand-ins go with it
    real = load_rig(Path(__file__).resolve().parents[2] / "rigs" / "example-cm4-io-board.toml", check_devices=False)
    assert find_body(real) is None


def test_rig_status_names_the_holder_the_last_state_and_reads_free_lines(
        held: tuple[Path, subprocess.Popen[str]]) -> None:
    rig, holder = held
    busy = hil("rig", "status", str(rig))
    assert busy.returncode == 0, busy.stderr
    assert re.search(rf"lock +held by pid {holder.pid} \(.*power on.*\) since \d{{4}}-", busy.stdout), busy.stdout
    assert re.search(r"last state powered, power on; by pid \d+", busy.stdout), busy.stdout
    assert "lines      not read: the holder drives them" in busy.stdout
    holder.send_signal(signal.SIGINT)  # Ctrl-C: the holder powers off and lets go
    assert holder.wait(timeout=30) == 0
    free = hil("rig", "status", str(rig))
    assert "lock       free" in free.stdout and "last state off, power off" in free.stdout, free.stdout
    assert re.search(r"line +power +GPIO5 \(mock\): released", free.stdout), free.stdout
