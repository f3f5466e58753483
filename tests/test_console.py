"""The serial console reader: expect, forbidden lines, commands, and failures that name their cause."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.control.console import Console
from hil.errors import Fault, InfrastructureError, ProductError, StageTimeout


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    yield master, path
    os.close(slave)
    with contextlib.suppress(OSError):
        os.close(master)


def fake_shell(master: int, stop: threading.Event) -> None:
    """A minimal shell on the device side: echoes input, answers two commands."""
    os.write(master, b"boot...\nhost login: ")
    status = 0
    buf = b""
    while not stop.is_set():
        try:
            buf += os.read(master, 1024)
        except OSError:
            return
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out = line + b"\n"
            if line == b"root":
                out = b"root\n"
            elif line == b"cat /etc/build-id":
                out += b"BUILD-42\n"
                status = 0
            elif line == b"printf X":
                out += b"X"  # no newline: the prompt follows on the same line
                status = 0
            elif line == b"echo $?":
                out += b"%d\n" % status
            elif line:
                out += b"-sh: " + line + b": not found\n"
                status = 127
            os.write(master, out + b"root@host:~# ")


def test_login_and_commands(pty: tuple[int, str], tmp_path: Path) -> None:
    master, path = pty
    stop = threading.Event()
    with Console(path, log_path=tmp_path / "console.log") as console:
        threading.Thread(target=fake_shell, args=(master, stop), daemon=True).start()
        console.login(timeout=5)
        result = console.run("cat /etc/build-id", timeout=5)
        assert (result.output, result.status) == ("BUILD-42", 0)
        assert console.run("printf X", timeout=5).output == "X"
        missing = console.run("frobnicate", timeout=5)
        assert missing.status == 127 and "not found" in missing.output
    stop.set()
    log = (tmp_path / "console.log").read_text()
    assert "BUILD-42" in log and log.startswith("[")


def test_timeout_shows_last_lines_and_log(pty: tuple[int, str], tmp_path: Path) -> None:
    master, path = pty
    with Console(path, log_path=tmp_path / "c.log") as console:
        os.write(master, b"U-Boot 2023.01\nStarting kernel ...\n")
        with pytest.raises(StageTimeout) as info:
            console.expect("login:", 0.3, stage="boot.login", what="login prompt")
    err = info.value
    assert err.fault is Fault.PRODUCT and err.stage == "boot.login"
    assert "Starting kernel" in str(err) and str(tmp_path / "c.log") in str(err)


def test_forbidden_line_fails_next_expect(pty: tuple[int, str]) -> None:
    master, path = pty
    with Console(path, forbidden=[r"Kernel panic - not syncing"]) as console:
        os.write(master, b"[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\nlogin: ")
        time.sleep(0.2)
        with pytest.raises(ProductError, match="forbidden line.*Kernel panic"):
            console.expect("login:", 2, stage="boot.login")


def test_garbage_points_at_baud_rate(pty: tuple[int, str]) -> None:
    master, path = pty
    with Console(path) as console:
        os.write(master, bytes(range(128, 256)) * 4)
        with pytest.raises(InfrastructureError, match="baud rate"):
            console.expect("login:", 0.5, stage="boot.login")


def test_unplugged_adapter_is_infrastructure(pty: tuple[int, str]) -> None:
    master, path = pty
    with Console(path) as console:
        os.close(master)
        with pytest.raises(InfrastructureError, match="went away"):
            console.expect("login:", 3, stage="boot.login")


def test_missing_device_is_infrastructure() -> None:
    with pytest.raises(InfrastructureError, match="cannot open the console /dev/ttyNOPE"):
        Console("/dev/ttyNOPE").open()


def test_sequences_split_between_reads_are_joined(pty: tuple[int, str], tmp_path: Path) -> None:
    """A read may end inside an escape sequence (busybox asks the cursor position, ESC[6n, after its prompt), a
    \\r\\n or a UTF-8 character: none of them may leak into the text, or a prompt at the end is not seen."""
    master, path = pty
    with Console(path, 115200, log_path=tmp_path / "console.log") as console:
        for piece in (b"caf\xc3", b"\xa9\r", b"\n~ # \x1b", b"[6n"):
            os.write(master, piece)
            time.sleep(0.15)  # separate reads
        console.expect(r"café\n~ # $", 2.0, stage="console.test", what="prompt")
