"""Every command of README.md's command table, run as a user types it against a virtual rig: a process of its own,
no ``hil virtual run`` around it, no payload folder in the rig file. The commands are read from the README itself,
so a row added there is run here.

Placeholders become real things: RIG the rig file, IMAGE/IMG the image ``hil image build OUT.img`` made, ID the
build-id ``hil flash`` read back, PROGRAM ``true``, DIR a folder fit for its option. Optional parts in brackets
are left out, except the few that keep a test's output in its own folder or its time short (KEEP).
``hil usbboot --port`` serves whatever boot ROM is on a port, as ``rpiboot -p`` does; the one module on a port here
is a virtual one, so that form alone runs under ``hil virtual run``, which puts the module in USB boot.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.hilrun import hil, hil_command
from tests.rigfiles import virtual_rig_toml

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("umockdev-wrapper") is None,
                                reason="the virtual rig's eMMC needs root and umockdev (run ./setup.sh)")

REPO = Path(__file__).resolve().parents[2]
KEEP = ("--report-dir", "--attempts")  # optional parts kept: reports in tmp_path, one boot per port
PORT = "1-1.4"
#: The order a user would follow: an image before it is flashed, a flash before the boot that proves it.
ORDER = ("--version", "rig", "image", "virtual", "power", "console", "usbboot", "flash", "boot", "eeprom", "matrix",
         "nightly", "report")


def readme_commands() -> list[str]:
    """Each command of the README's command table, alternatives (``on|off|cycle``) spelt out one by one."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    commands = []
    for row in table.splitlines():
        if not row.startswith("| `hil "):
            continue
        first = row.split(" | ")[0]
        for command in re.findall(r"`(hil [^`]+)`", first):
            command = command.replace("\\|", "|")
            words = command.split()
            choice = next((i for i, w in enumerate(words) if "|" in w and not w.startswith("[")), None)
            if choice is None:
                commands.append(command)
                continue
            for option in words[choice].split("|"):
                commands.append(" ".join(words[:choice] + [option] + words[choice + 1:]))
    return commands


def argv_of(command: str, values: dict[str, str]) -> list[str]:
    """The command's words with optional parts dropped (KEEP excepted) and placeholders filled."""
    kept = re.sub(r"\[(--[\w-]+)([^\]]*)\]", lambda m: m[1] + m[2] if m[1] in KEEP else "", command)
    kept = re.sub(r"\[[^\]]*\]", "", kept)  # "[--broken ...]" and the like
    words = kept.split()[1:]
    out = []
    for i, word in enumerate(words):
        flag = words[i - 1] if i else ""
        out.append(values.get(f"{flag} {word}", values.get(word, word)))
    return out


@pytest.fixture
def rig(tmp_path: Path) -> Path:
    """A virtual cm4 with no payload folder: the rig session makes stand-ins."""
    path = tmp_path / "readme-cm4.toml"
    path.write_text(virtual_rig_toml(f"readme-cm4-{os.getpid()}", "cm4", PORT, state_dir=tmp_path / "state",
                                     emmc="512MiB", timeouts={"rom": 10, "bootloader": 10, "kernel": 15,
                                                               "login": 20, "mass_storage": 20}))
    return path


def test_the_readme_names_every_command() -> None:
    names = {" ".join(c.split()[1:2]) for c in readme_commands()}
    assert names == set(ORDER), names


def test_every_readme_command_works_as_written(rig: Path, tmp_path: Path) -> None:
    payloads = tmp_path / "payloads"
    made = hil("virtual", "payload", str(payloads), "--kind", "mass-storage-gadget64", "--kind", "recovery")
    assert made.returncode == 0, made.stderr
    values = {"RIG": str(rig), "RIG...": str(rig), "OUT.img": str(tmp_path / "out.img"), "PROGRAM": "true",
              "IMAGE": str(tmp_path / "out.img"), "IMG": str(tmp_path / "out.img"), "1-1.3": PORT, "K": "1",
              "--payload DIR": str(payloads / "mass-storage-gadget64"), "--report-dir DIR": str(tmp_path / "night"),
              "--out DIR": str(tmp_path / "eeprom-out"), "IN.bin": str(payloads / "recovery" / "pieeprom.original.bin"),
              "boot.conf": str(payloads / "recovery" / "boot.conf"),
              "RESULTS...": str(tmp_path / "night" / "allure-results"), "REPORT": str(tmp_path / "again")}
    commands = sorted(readme_commands(), key=lambda c: ORDER.index(c.split()[1]))
    ran = []
    for command in commands:
        argv = argv_of(command, values)
        started = time.monotonic()
        if argv[:2] == ["power", "on"]:
            code, out = power_on_until_interrupted(argv, tmp_path)
        elif argv[0] == "usbboot" and "--port" in argv:
            done = hil("virtual", "run", "--rig", str(rig), "--", *hil_command(*argv)[0], cwd=tmp_path, timeout=180)
            code, out = done.returncode, done.stdout + done.stderr
        else:
            done = hil(*argv, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=400)
            code, out = done.returncode, done.stdout + done.stderr
        assert code == 0, f"`{command}` as `hil {' '.join(argv)}` exited {code}:\n{out[-3000:]}"
        ran.append(f"{time.monotonic() - started:6.1f} s  hil {' '.join(argv)}")
        if argv[0] == "flash":
            found = re.search(r"build-id (\w+)", out)
            assert found, out
            values["ID"] = found[1]
    print("\n".join(ran))
    assert len(ran) == len(commands) >= 15


def power_on_until_interrupted(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``hil power on`` on a relay holds the relay while it runs: wait until it says so, then Ctrl-C it."""
    command, env = hil_command(*argv)
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        seen.append(line)
        if "powered on" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + out + err
