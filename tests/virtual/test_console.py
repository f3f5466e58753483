"""The virtual console as a host program sees it: a serial port opened by path with pyserial."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial

from hil.errors import ExitCode, RigFileError
from hil.rig import load_rig
from hil.virtual.console import VirtualConsole
from hil.virtual.journal import Journal
from hil.virtual.timing import DeviceClock
from tests.rigfiles import virtual_rig_toml


@pytest.fixture
def console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], VirtualConsole]]:
    """An open console for a rig whose ``[virtual.console]`` table is the given TOML."""
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    made: list[VirtualConsole] = []

    def make(faults: str = "") -> VirtualConsole:
        path = tmp_path / "rig.toml"
        path.write_text(virtual_rig_toml("con", "cm4", "1-1.3", boot_gpio=None, nwp_gpio=None, off_time=None,
                                         baud=115200, speedup=100, emmc_speed=None,
                                         extra=("[virtual.console]\n" + faults) if faults else ""))
        rig = load_rig(path)
        made.append(VirtualConsole.for_rig(rig, DeviceClock(100), Journal()).open())
        return made[-1]

    yield make
    for c in made:
        c.close()


def read_for(port: serial.Serial, seconds: float) -> bytes:
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += port.read(max(1, port.in_waiting))
    return got


def wait_drained(c: VirtualConsole) -> None:
    deadline = time.monotonic() + 5
    while not c.drained():
        assert time.monotonic() < deadline, "console output never left"
        time.sleep(0.01)


def test_port_keeps_its_path_and_sees_only_live_output(console: Callable[[str], VirtualConsole]) -> None:
    c = console("")
    assert c.path.is_symlink() and os.readlink(c.path).startswith("/dev/pts/")
    c.write("said while nobody listened\n")
    wait_drained(c)
    fd = os.open(c.path, os.O_RDWR | os.O_NOCTTY)  # a plain reader: pyserial would flush old input anyway
    try:
        c.write("hello\n")
        assert select.select([fd], [], [], 5)[0]
        assert os.read(fd, 4096) == b"hello\r\n"
    finally:
        os.close(fd)
    c.write("between two sessions\n")
    wait_drained(c)
    with serial.Serial(str(c.path), 115200, timeout=0.05) as port:
        c.write("again\n")
        assert read_for(port, 0.2) == b"again\r\n"


def test_input_reaches_the_module(console: Callable[[str], VirtualConsole]) -> None:
    c = console("")
    got: list[bytes] = []
    c.on_receive(got.append)
    with serial.Serial(str(c.path), 115200, timeout=0.05) as port:
        port.write(b"root\r")
        deadline = time.monotonic() + 5
        while b"".join(got) != b"root\r" and time.monotonic() < deadline:
            time.sleep(0.01)
    assert b"".join(got) == b"root\r"


def test_a_reader_that_does_not_read_never_blocks_the_module(console: Callable[[str], VirtualConsole]) -> None:
    c = console("")
    with serial.Serial(str(c.path), 115200, timeout=0.05) as port:
        c.write(b"x" * 512 * 1024)
        wait_drained(c)  # gone from the module's side, whether or not the host took it
        received = read_for(port, 0.2)
    assert 0 < len(received) < 512 * 1024  # the pty buffer's worth; the rest fell on the floor


def test_unplug_after_removes_the_port_under_its_reader(console: Callable[[str], VirtualConsole]) -> None:
    c = console("unplug_after = 0.3\n")
    with serial.Serial(str(c.path), 115200, timeout=0.05) as port, pytest.raises(serial.SerialException):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            port.read(1)
    assert c.unplugged and not c.path.exists() and not c.path.is_symlink()
    with pytest.raises(serial.SerialException):
        serial.Serial(str(c.path), 115200)


def test_garbage_mangles_both_directions(console: Callable[[str], VirtualConsole]) -> None:
    c = console("garbage = true\n")
    got: list[bytes] = []
    c.on_receive(got.append)
    with serial.Serial(str(c.path), 115200, timeout=0.05) as port:
        c.write("RPi: BOOTLOADER release\n")
        text = read_for(port, 0.2)
        port.write(b"root\r")
        deadline = time.monotonic() + 5
        while len(b"".join(got)) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(text) == len("RPi: BOOTLOADER release\r\n") and all(b >= 0x80 for b in text)
    assert len(b"".join(got)) == 5 and b"root" not in b"".join(got)


@pytest.mark.parametrize(("faults", "key"), [
    ("unplug_after = -1\n", "virtual.console.unplug_after"),
    ('unplug_after = "soon"\n', "virtual.console.unplug_after"),
    ('garbage = "yes"\n', "virtual.console.garbage"),
    ("unplug_afterr = 2\n", "virtual.console.unplug_afterr"),
])
def test_bad_faults_are_named(console: Callable[[str], VirtualConsole], faults: str, key: str) -> None:
    with pytest.raises(RigFileError) as err:
        console(faults)
    assert err.value.key == key and err.value.exit_code == ExitCode.INPUT and "Fix:" in str(err.value)
