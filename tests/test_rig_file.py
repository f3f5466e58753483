"""Rig files: the shipped ones load, and every kind of breakage gets one clear error and exit code 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hil.cli import main
from hil.errors import RigFileError
from hil.rig import load_rig

GOOD = """
name = "t"
model = "cm4"
[emmc]
size = "256MiB"
[relays]
[relays.power]
gpio = 17
[relays.nrpi_boot]
gpio = 27
active_high = false
[usb]
port = "1-1.3"
[console]
baud = 115200
[virtual]
speedup = 10
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rig.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "rigs").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_rigs_load(path: Path) -> None:
    rig = load_rig(path, check_devices=False)
    assert rig.relays.nrpi_boot is not None
    assert (rig.relays.power is not None) == (rig.power.backend == "relay")  # or a hub port, or commands
    assert all(re.match(r"^\d+-\d+(\.\d+)*$", port) for port in rig.usb_ports)
    assert rig.is_virtual == path.stem.startswith("virtual-")


def test_good_rig_resolves(tmp_path: Path) -> None:
    rig = load_rig(write(tmp_path, GOOD))
    assert rig.model.rom_pid == 0x2711
    assert rig.emmc_size == 256 * 1024**2
    assert rig.relays.nrpi_boot is not None and rig.relays.nrpi_boot.active_high is False
    assert rig.console.virtual and rig.console.device.endswith("/t/console")
    assert rig.virtual is not None and rig.virtual.speedup == 10.0
    assert rig.timeouts["rom"] > 0


BROKEN = [
    (GOOD.replace('model = "cm4"', 'model = "cm6"'), "model", "use one of cm1"),
    (GOOD.replace('model = "cm4"', 'model = "cm44"'), "model", "did you mean 'cm4'"),
    (GOOD.replace('model = "cm4"\n', ""), "model", "add model"),
    (GOOD.replace("gpio = 27", "gpio = 17"), "relays.nrpi_boot.gpio", "own GPIO"),
    (GOOD.replace("gpio = 27", "gpio = 99"), "relays.nrpi_boot.gpio", "0 to 53"),
    (GOOD.replace('port = "1-1.3"', 'port = "usb1"'), "usb.port", "BUS-PORT"),
    (GOOD.replace('size = "256MiB"', 'size = "lots"'), "emmc.size", "8GB or 512MiB"),
    (GOOD.replace("baud = 115200", "baud = 115200\nbaudd = 1"), "console.baudd", "did you mean 'baud'"),
    (GOOD.replace("[relays]\n", '[relays]\npin_factory = "lgpio"\n'), "relays.pin_factory", "mock"),
    (GOOD + "[timeouts]\nromm = 3\n", "timeouts.romm", "did you mean 'rom'"),
    (GOOD.replace("speedup = 10", "speedup = 0"), "virtual.speedup", "positive"),
    (GOOD + "[boot.markers]\nlogin = '(['\n", "boot.markers.login", "regular expression"),
    ("model = [", "", "valid TOML"),
    (GOOD + '[power]\nbackend = "plug"\n', "power.backend", "uhubctl"),
]


@pytest.mark.parametrize(("text", "key", "fix"), BROKEN)
def test_broken_rig_names_key_and_fix(tmp_path: Path, text: str, key: str, fix: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RigFileError) as info:
        load_rig(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert fix in message


def test_real_rig_console_must_exist(tmp_path: Path) -> None:
    text = GOOD.replace("[virtual]\nspeedup = 10\n", "").replace('"256MiB"', '"8GB"')
    text = text.replace("baud = 115200", 'baud = 115200\ndevice = "/dev/ttyNOPE9"')
    with pytest.raises(RigFileError, match="ttyNOPE9 does not exist.*USB-serial"):
        load_rig(write(tmp_path, text))
    assert load_rig(write(tmp_path, text), check_devices=False).console.device == "/dev/ttyNOPE9"


def test_real_rig_emmc_size_must_fit_model(tmp_path: Path) -> None:
    text = GOOD.replace("[virtual]\nspeedup = 10\n", "").replace("baud = 115200", 'device = "/dev/null"')
    with pytest.raises(RigFileError, match="emmc.size.*not an eMMC size of a cm4"):
        load_rig(write(tmp_path, text))


def test_cli_check_prints_rig_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str], repo: Path) -> None:
    assert main(["rig", "check", str(repo / "rigs" / "virtual-cm4.toml")]) == 0
    out = capsys.readouterr().out
    assert "model      cm4" in out and "GPIO17" in out and "1-1.4" in out
    bad = write(tmp_path, GOOD.replace('model = "cm4"', 'model = "cm9"'))
    assert main(["rig", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model" in err and "Traceback" not in err
    assert main(["rig", "check", str(tmp_path / "missing.toml")]) == 2


REAL = GOOD.replace("[virtual]\nspeedup = 10\n", "").replace('"256MiB"', '"8GB"').replace(
    "baud = 115200", 'device = "/dev/null"')
NO_POWER_RELAY = REAL.replace("[relays.power]\ngpio = 17\n", "")


def test_power_backends_resolve(tmp_path: Path) -> None:
    assert load_rig(write(tmp_path, REAL)).power.backend == "relay"
    hub = load_rig(write(tmp_path, NO_POWER_RELAY + '[power]\nbackend = "uhubctl"\nhub = "1-1"\nport = 3\n'))
    assert (hub.power.backend, hub.power.hub, hub.power.port, hub.relays.power) == ("uhubctl", "1-1", 3, None)
    cmd = load_rig(write(tmp_path, NO_POWER_RELAY + '[power]\nbackend = "command"\non = "plug on \'lab 1\'"\n'
                         'off = ["plug", "off", "lab 1"]\n'))
    assert cmd.power.on == ("plug", "on", "lab 1") and cmd.power.off == ("plug", "off", "lab 1")
    assert cmd.power.status == ()


@pytest.mark.parametrize(("text", "key", "fix"), [
    (REAL + '[power]\nbackend = "uhubctl"\nhub = "1-1"\nport = 3\n', "relays.power", "remove [relays.power]"),
    (NO_POWER_RELAY + '[power]\nbackend = "uhubctl"\nport = 3\n', "power.hub", "uhubctl -l"),
    (NO_POWER_RELAY + '[power]\nbackend = "uhubctl"\nhub = "1-1"\nport = 0\n', "power.port", "port number"),
    (NO_POWER_RELAY + '[power]\nbackend = "command"\non = ["x"]\n', "power.off", "add off"),
    (NO_POWER_RELAY + '[power]\nbackend = "command"\non = "x \'y"\noff = "x"\n', "power.on", "quotes"),
    (NO_POWER_RELAY + '[power]\nbackend = "command"\non = ["x", 1]\noff = "x"\n', "power.on", "strings"),
    (NO_POWER_RELAY, "relays.power", "add [relays.power]"),
])
def test_broken_power_names_key_and_fix(tmp_path: Path, text: str, key: str, fix: str) -> None:
    with pytest.raises(RigFileError) as info:
        load_rig(write(tmp_path, text))
    assert key in str(info.value) and fix in str(info.value)
