"""Host profiles, the controller identity and the matrix on the virtual rig: umockdev bus, real libusb and pyudev.

Buses 17, 18, 25 and 26 are this file's own; the matrix rig files use 15 and 16, the hypotheses rig 21-24 (no
other test file uses them).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.cli import main as hil_main
from hil.control.hostctl import SpeedRecorder, identify, port_speed
from hil.errors import InfrastructureError
from hil.models import MODELS
from hil.report.environment import HOST_INCOMPATIBILITY_PHRASE
from hil.usbboot.host import UsbBoot
from hil.virtual.journal import Journal
from hil.virtual.timing import DeviceClock
from hil.virtual.usb.payloads import make_payload
from hil.virtual.usb.side import VirtualUsb
from hil.virtual.usb.switches import default_switches

if os.geteuid() != 0 or "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("needs root and umockdev: run pytest as root under umockdev-wrapper", allow_module_level=True)

from hil.virtual.usb.umockdev_bus import UsbBus  # noqa: E402

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
TIMEOUTS = {"rom": 3.0, "rom_transfer": 3.0, "second_stage": 3.0, "file_server": 10.0, "mass_storage": 3.0}


@pytest.fixture(scope="module")
def bus() -> UsbBus:
    return UsbBus.get()


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_payload(tmp_path_factory.mktemp("payload"), "msd", ("cm1", "cm3"), boot_img_size=MIB)


@pytest.fixture
def module(bus: UsbBus, tmp_path: Path) -> Iterator[Callable[[str, str, str], tuple[VirtualUsb, Journal]]]:
    """module(model, port, controller): a virtual module's USB side powered into USB boot on that port."""
    emmc = tmp_path / "emmc.img"
    with open(emmc, "wb") as f:
        f.truncate(64 * MIB)
    made: list[VirtualUsb] = []

    def make(name: str, port: str, controller: str) -> tuple[VirtualUsb, Journal]:
        journal = Journal()
        model = MODELS[name]
        side = VirtualUsb(model, bus.port(port, controller, journal), str(emmc), 64 * MIB, default_switches(model),
                          DeviceClock(50.0), journal)
        made.append(side)
        side.power_on(usb_boot=True)
        return side, journal

    yield make
    for side in made:
        side.power_off()


def test_identity_walks_from_the_port_up_to_the_controller(bus: UsbBus) -> None:
    bus.port("17-2", "xhci-lenient")
    bus.port("18-1.3", "ehci-hypothesis-maxpacket")
    xhci, ehci = identify("17-2"), identify("18-1.3")
    assert (xhci.driver, xhci.subsystem, xhci.ids) == ("xhci_hcd", "pci", "8086:a36d")
    assert (ehci.driver, ehci.ids) == ("ehci-pci", "8086:1e26")
    assert re.fullmatch(r"0000:00:[0-9a-f]{2}\.[0-7]", ehci.address) and ehci.address != xhci.address
    assert [h.name for h in xhci.hubs] == ["usb17"]
    assert [(h.name, h.id, h.speed) for h in ehci.hubs] == [("usb18", "1d6b:0002", "high"),
                                                            ("18-1", "05e3:0610", "high")]
    assert ehci.label == f"ehci-pci 8086:1e26 ({ehci.address})" and "18-1 [05e3:0610" in ehci.describe()
    assert "(hypothesis maxpacket, unconfirmed)" in ehci.hubs[0].product  # the report names the hypothesis
    assert "hypothesis" not in xhci.hubs[0].product
    assert port_speed("18-1.3") is None  # nothing cabled there
    with pytest.raises(InfrastructureError, match="hub 18-2 of port 18-2.1 does not exist"):
        identify("18-2.1")


def boot(port: str, payload: Path, name: str) -> tuple[Any, SpeedRecorder]:
    recorder = SpeedRecorder(port)
    try:
        return UsbBoot(port, payload, MODELS[name], settle=0.01, timeouts=TIMEOUTS, listener=recorder).run(), recorder
    except InfrastructureError as e:
        return e, recorder


def test_cm1_passes_a_lenient_controller_at_full_speed_without_a_kernel_warning(module: Any, payload: Path) -> None:
    """usbboot #69: a 2835 ROM at full speed on Linux, no "invalid maxpacket" line."""
    _, journal = module("cm1", "17-1", "xhci-lenient")
    result, recorder = boot("17-1", payload, "cm1")
    assert result.final_identity is not None and result.final_identity.pid == 0x0001
    assert recorder.speeds == {"rom": "full", "second_stage": "high", "mass_storage": "high"}
    assert not [e for e in journal.events("usb") if e.what in ("kernel", "refused")]


def test_cm1_fails_a_hypothesis_controller_on_every_rom_exchange(module: Any, payload: Path) -> None:
    _, journal = module("cm1", "18-2", "ehci-hypothesis-maxpacket")
    error, recorder = boot("18-2", payload, "cm1")
    assert isinstance(error, InfrastructureError) and error.stage == "usbboot.rom_transfer"
    first = error.evidence["trace"]["transfers"][0]
    assert (first["kind"], first["value"], first["result"]) == ("control_out", 24, "io")  # rpiboot: (-1,24)
    assert len(error.evidence["rom_attempts"]) == 3  # the first try and the default two retries
    assert recorder.speeds == {"rom": "full"}
    assert {e.details["controller"] for e in journal.events("usb") if e.what == "refused"} == {
        "ehci-hypothesis-maxpacket"}
    assert not journal.events("bulk")  # nothing reached the ROM


@pytest.mark.parametrize(("port", "controller"), [("17-3", "xhci-lenient"), ("18-3", "ehci-hypothesis-maxpacket")])
def test_cm3_passes_both_controllers(module: Any, payload: Path, port: str, controller: str) -> None:
    _, journal = module("cm3", port, controller)
    result, recorder = boot(port, payload, "cm3")
    assert result.final_identity is not None and recorder.speeds["rom"] == "high"
    assert not [e for e in journal.events("usb") if e.what in ("kernel", "refused")]


def test_hil_matrix_table_picture_and_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reports = tmp_path / "reports"
    for rig, code in (("virtual-cm1-matrix", 3), ("virtual-cm1-matrix", 3), ("virtual-cm3-matrix", 0)):
        assert hil_main(["matrix", "--rig", str(REPO / "rigs" / f"{rig}.toml"), "--attempts", "2",
                         "--reports", str(reports)]) == code
    out = capsys.readouterr().out
    last = out[out.rindex("controller "):]
    rows = {tuple(line.split()[i] for i in (0, 3, 5, 6, 7)): line for line in last.splitlines()[1:-2] if line}
    # controller driver, model, this run, history, runs
    assert set(rows) == {("xhci_hcd", "cm1", "-", "4/4", "2"), ("ehci-pci", "cm1", "-", "0/4", "2"),
                         ("xhci_hcd", "cm3", "2/2", "2/2", "1"), ("ehci-pci", "cm3", "2/2", "2/2", "1")}
    assert "2/2 2/2" in rows[("xhci_hcd", "cm1", "-", "4/4", "2")]  # each run's own count
    assert f"16-1: {HOST_INCOMPATIBILITY_PHRASE} on 16-1" in out and "booted through 15-1" in out
    assert (reports / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with sqlite3.connect(reports / "matrix.db") as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (3,)
        categories = db.execute("SELECT model, port, category, COUNT(*) FROM attempts GROUP BY 1, 2, 3").fetchall()
        identity = json.loads(db.execute("SELECT identity FROM attempts WHERE port = '16-1'").fetchone()[0])
    assert sorted(categories) == [("cm1", "15-1", "pass", 4), ("cm1", "16-1", "host-incompatibility", 4),
                                  ("cm3", "15-1", "pass", 2), ("cm3", "16-1", "pass", 2)]
    assert identity["driver"] == "ehci-pci" and identity["hubs"][0]["name"] == "usb16"


def test_a_cm1_failing_on_every_port_is_not_a_host_incompatibility(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """No port boots it and no history says otherwise: a cable, power or hub fault is as likely, so the
    failures stay infrastructure (exit 3), with the evidence a bug report needs."""
    text = (REPO / "rigs" / "virtual-cm1-matrix.toml").read_text()
    text = text.replace('"15-1"', '"25-1"').replace('"16-1"', '"26-1"').replace(
        '"25-1" = "xhci-lenient"', '"25-1" = "ehci-hypothesis-maxpacket"').replace(
        '"26-1" = "ehci-hypothesis-maxpacket"', '"26-1" = "xhci-hypothesis-status"')
    rig = tmp_path / "all-fail.toml"
    rig.write_text(text.replace('name = "virtual-cm1-matrix"', 'name = "virtual-cm1-all-fail"'))
    reports = tmp_path / "reports"
    assert hil_main(["matrix", "--rig", str(rig), "--attempts", "1", "--reports", str(reports)]) == 3
    out = capsys.readouterr().out
    assert HOST_INCOMPATIBILITY_PHRASE not in out
    assert "usbmon unavailable" in out  # how to enable it is said, per attempt
    with sqlite3.connect(reports / "matrix.db") as db:
        assert db.execute("SELECT port, category FROM attempts ORDER BY port").fetchall() == [
            ("25-1", "infrastructure"), ("26-1", "infrastructure")]
        evidence = json.loads(db.execute("SELECT evidence FROM evidence WHERE port = '26-1'").fetchone()[0])
    assert evidence["speeds"] == {"rom": "full"} and evidence["controller"]["driver"] == "xhci_hcd"
    assert "hypothesis status" in evidence["controller"]["hubs"][0]["product"]
    assert evidence["kernel"].startswith("Linux ") and "usbmon" in evidence["usbmon_note"]
    assert hil_main(["matrix", "--rig", str(rig), "--attempts", "1", "--reports", str(reports),
                     "--record-only"]) == 0


def test_the_matrix_cycles_every_hypothesis_on_a_virtual_cm1(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    reports = tmp_path / "reports"
    assert hil_main(["matrix", "--rig", str(REPO / "rigs" / "virtual-cm1-hypotheses.toml"), "--attempts", "1",
                     "--reports", str(reports), "--record-only"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[2]: line for line in out.splitlines() if line.startswith("cm1 via ")}
    assert "ok in" in lines["21-1"] and "hypothesis" not in lines["21-1"]
    for port, name, result in (("22-1", "maxpacket", "io"), ("23-1", "status", "pipe"),
                               ("24-1", "timeout", "timeout")):
        assert f"(hypothesis {name}, unconfirmed)" in lines[port] and f"for boot message: {result}" in lines[port]
        verdict = next(line for line in out.splitlines() if line.startswith(f"{port}: {HOST_INCOMPATIBILITY_PHRASE}"))
        assert f"(hypothesis {name}, unconfirmed)]: the same cm1 booted through 21-1" in verdict
