"""The host against the virtual module: umockdev bus, real libusb, pyusb and pyudev in this process.

Each trace is checked step by step against usbboot-protocol.md sections 2-4 and against what the
virtual module itself recorded. Run under ``umockdev-wrapper`` (the module skips without its preload).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.cli import main as hil_main
from hil.errors import InfrastructureError, InputError, ProductError
from hil.models import MODELS
from hil.usbboot.host import UsbBoot, UsbBootResult
from hil.usbboot.trace import Transfer
from hil.virtual.journal import Journal
from hil.virtual.timing import DeviceClock
from hil.virtual.usb.payloads import make_payload
from hil.virtual.usb.side import VirtualUsb
from hil.virtual.usb.switches import UsbSwitches, default_switches
from tests.genuine_shapes import gadget_folder, msd_folder, recovery_bin

if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("needs umockdev: run pytest under umockdev-wrapper", allow_module_level=True)

from hil.virtual.usb.umockdev_bus import UsbBus  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SPEEDUP = 50.0
MIB = 1024 * 1024
CHUNK = 16384  # LIBUSB_MAX_TRANSFER, section 2
TIMEOUTS = {"rom": 3.0, "rom_transfer": 3.0, "second_stage": 3.0, "file_server": 10.0, "mass_storage": 3.0}


@pytest.fixture(scope="module")
def bus() -> UsbBus:
    return UsbBus.get()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("payloads")
    for kind in ("msd", "mass-storage-gadget64", "recovery", "recovery5"):
        make_payload(root, kind, boot_img_size=MIB)
    return root


@pytest.fixture
def emmc(tmp_path: Path) -> Path:
    path = tmp_path / "emmc.img"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
    return path


Module = tuple[VirtualUsb, Journal]


@pytest.fixture
def module(bus: UsbBus, emmc: Path) -> Iterator[Callable[..., Module]]:
    """A powered virtual module in USB boot mode: module(model, port, **switches)."""
    made: list[VirtualUsb] = []

    def make(name: str, port: str, power: bool = True, **switches: Any) -> Module:
        model = MODELS[name]
        journal = Journal()
        side = VirtualUsb(model, bus.port(port), str(emmc), 64 * MIB,
                          UsbSwitches(**{**default_switches(model).__dict__, **switches}),
                          DeviceClock(SPEEDUP), journal)
        made.append(side)
        if power:
            side.power_on(usb_boot=True)
        return side, journal

    yield make
    for side in made:
        side.power_off()


def boot(port: str, payload: Path, name: str | None, **options: Any) -> UsbBootResult:
    options = {"settle": 0.01, "timeouts": TIMEOUTS, **options}
    return UsbBoot(port, payload, MODELS[name] if name else None, **options).run()


def of_stage(result_or_trace: Any, stage: str) -> list[Transfer]:
    transfers = result_or_trace.trace.transfers
    return [t for t in transfers if t.stage == stage]


def check_write(transfers: list[Transfer], size: int) -> list[Transfer]:
    """announce(size) then bulk OUT chunks of at most 16 KiB adding up to size; returns what follows."""
    announce = transfers[0]
    assert (announce.kind, announce.request_type, announce.request) == ("control_out", 0x40, 0)
    assert (announce.value, announce.index, announce.length) == (size & 0xFFFF, size >> 16, 0)
    n = -(-size // CHUNK)
    chunks = transfers[1:1 + n]
    assert all(c.kind == "bulk_out" and c.length <= CHUNK and c.result == "ok" for c in chunks)
    assert sum(c.actual for c in chunks) == size
    return transfers[1 + n:]


def check_rom_exchange(result: UsbBootResult, image_size: int, out_ep: int) -> None:
    """Section 3.2: boot message (24 bytes), second stage, 4-byte status read."""
    rest = check_write(of_stage(result, "rom_transfer"), 24)
    rest = check_write(rest, image_size)
    assert [(t.kind, t.request_type, t.value, t.index, t.length, t.actual, t.result) for t in rest] == [
        ("control_in", 0xC0, 4, 0, 4, 4, "ok")]
    assert {t.endpoint for t in of_stage(result, "rom_transfer") if t.kind == "bulk_out"} == {out_ep}


def check_file_server(result: UsbBootResult, journal: Journal) -> None:
    """Section 4.2: every request read is 260 bytes; answers match what the device asked and got."""
    transfers = of_stage(result, "file_server")
    assert all(t.result == "ok" for t in transfers)
    reads = [t for t in transfers if t.kind == "control_in"]
    assert all((t.request_type, t.value, t.index, t.length) == (0xC0, 260, 0, 260) for t in reads)
    assert {t.request_type for t in transfers if t.kind == "control_out"} == {0x40}
    device_reads = [(e.what, e.details["size"]) for e in journal.events("file")
                    if e.details["command"] == "ReadFile"]
    assert [(f.name, f.size) for f in result.files_served if f.source] == device_reads
    asked = [e.what for e in journal.events("file") if e.details["command"] == "GetFileSize"]
    sizes = {e.what: e.details["size"] for e in journal.events("file") if e.details["command"] == "GetFileSize"}
    for name in asked:  # each GetFileSize answered with an announce carrying the size, no bulk
        answer = next(t for t in transfers if t.kind == "control_out" and t.note.endswith(f" {name}"))
        assert answer.value | answer.index << 16 == (sizes[name] or 0)
    for name, size in device_reads:
        data = [t for t in transfers if t.kind == "bulk_out" and t.note == name]
        assert sum(t.actual for t in data) == size


@pytest.mark.parametrize(("name", "kind", "port", "final_pid"), [
    ("cm1", "msd", "7-1.1", "0001"), ("cm3", "msd", "7-1.2", "0001"), ("cm4", "msd", "7-1.3", "0001"),
    ("cm4", "mass-storage-gadget64", "7-1.4", "0104"), ("cm5", "mass-storage-gadget64", "7-1.5", "0104")])
def test_boots_to_mass_storage_with_the_documented_exchange(module: Callable[..., Module], payloads: Path,
                                                            name: str, kind: str, port: str, final_pid: str) -> None:
    _, journal = module(name, port)
    result = boot(port, payloads / kind, name)

    assert [(s.name, s.ok) for s in result.stages] == [
        ("rom", True), ("rom.settle", True), ("rom_transfer", True), ("second_stage", True),
        ("second_stage.settle", True), ("file_server", True), ("mass_storage", True)]
    image = next(e for e in journal.events("bulk") if e.what == MODELS[name].second_stage)
    check_rom_exchange(result, image.details["bytes"], out_ep=0x01)
    check_file_server(result, journal)
    assert not [t for t in result.trace.transfers if t.stage not in ("rom_transfer", "file_server")]
    assert result.final_identity is not None
    assert f"{result.final_identity.vid:04x}:{result.final_identity.pid:04x}" == f"0a5c:{final_pid}"
    assert not journal.events("fault")
    assert [a["outcome"] for a in result.rom_attempts] == ["ok"]
    data = json.loads(result.to_json())
    assert data["final_identity"]["pid"] == final_pid and data["port"] == port


@pytest.mark.parametrize(("name", "kind"), [("cm4", "recovery"), ("cm5", "recovery5")])
def test_recovery_returns_the_metadata(module: Callable[..., Module], payloads: Path, tmp_path: Path,
                                       name: str, kind: str) -> None:
    side, journal = module(name, "7-2.1")
    meta = tmp_path / "meta.json"
    result = boot("7-2.1", payloads / kind, name, metadata_json=meta)
    assert [s.name for s in result.stages][-1] == "file_server"
    assert result.metadata["EEPROM_UPDATE"] == "success"
    assert result.metadata["USER_SERIAL_NUM"] == side.serial
    assert json.loads(meta.read_text()) == result.metadata
    assert result.final_identity is not None and result.final_identity.iserial == 4
    check_file_server(result, journal)


def test_model_comes_from_the_rom_when_not_given(module: Callable[..., Module], payloads: Path) -> None:
    module("cm5", "7-2.2")
    result = boot("7-2.2", payloads / "mass-storage-gadget64", None)
    assert result.model == "cm5" and result.final_identity is not None


def test_missing_second_stage_is_input_error_before_any_transfer(module: Callable[..., Module], payloads: Path,
                                                                tmp_path: Path) -> None:
    side, journal = module("cm4", "7-3.1")
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.txt").write_bytes((payloads / "mass-storage-gadget64" / "config.txt").read_bytes())
    with pytest.raises(InputError) as e:
        boot("7-3.1", folder, "cm4")
    assert "bootcode4.bin" in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        boot("7-3.1", tmp_path / "nowhere", "cm4")
    assert not journal.events("bulk") and not journal.events("fault")


def test_wrong_model_on_the_port_is_input_error(module: Callable[..., Module], payloads: Path) -> None:
    _, journal = module("cm5", "7-3.2")
    with pytest.raises(InputError, match="rig says cm4"):
        boot("7-3.2", payloads / "mass-storage-gadget64", "cm4")
    assert not journal.events("bulk")


def test_rom_that_rejects_every_exchange_is_a_product_error_after_the_retries(
        module: Callable[..., Module], payloads: Path) -> None:
    _, journal = module("cm4", "7-3.3", rom_status=0x1234)
    with pytest.raises(ProductError) as e:
        boot("7-3.3", payloads / "mass-storage-gadget64", "cm4", rom_retries=1)
    assert e.value.stage == "usbboot.rom_transfer" and "0x1234" in str(e.value)
    assert [a["status"] for a in e.value.evidence["rom_attempts"]] == [0x1234, 0x1234]
    status = e.value.evidence["trace"]["transfers"][-1]
    assert (status["kind"], status["length"], status["result"]) == ("control_in", 4, "ok")
    assert [e.details["status"] for e in journal.events("stage") if e.what == "rom-status"] == [0x1234, 0x1234]


def test_rom_answering_an_odd_status_still_boots(module: Callable[..., Module], payloads: Path) -> None:
    """rpiboot prints a non-zero status and goes on (main.c:651-663); so does the host, and it says so."""
    module("cm4", "7-7.1", rom_odd_status=0x8000_0007)
    result = boot("7-7.1", payloads / "mass-storage-gadget64", "cm4")
    assert result.final_identity is not None and result.final_identity.pid == 0x0104
    assert [(a["status"], a["outcome"]) for a in result.rom_attempts] == [(0x8000_0007, "status 0x80000007")]
    transfer = next(s for s in result.stages if s.name == "rom_transfer")
    assert "status 0x80000007" in transfer.detail and "not fatal" in transfer.detail


def test_two_failed_rom_exchanges_then_success_boots_with_every_attempt_recorded(
        module: Callable[..., Module], payloads: Path) -> None:
    """usbboot #87: "Failed control transfer (-7,24)" on the boot message; rpiboot loops, the host retries."""
    _, journal = module("cm4", "7-7.2", rom_failed_exchanges=2)
    result = boot("7-7.2", payloads / "mass-storage-gadget64", "cm4", rom_retries=2)
    assert result.final_identity is not None
    outcomes = [a["outcome"] for a in result.rom_attempts]
    assert len(outcomes) == 3 and outcomes[2] == "ok"
    assert all("announce(24) for boot message: timeout" in o for o in outcomes[:2])
    assert [(s.attempt, s.ok) for s in result.stages if s.name == "rom_transfer"] == [(1, False), (2, False),
                                                                                     (3, True)]
    assert [e.what for e in journal.events("fault")] == ["rom_failed_exchanges"] * 2
    assert json.loads(result.to_json())["rom_attempts"][0]["outcome"] == outcomes[0]


def test_failed_rom_exchanges_beyond_the_retries_are_an_infrastructure_error(
        module: Callable[..., Module], payloads: Path) -> None:
    module("cm4", "7-7.3", rom_failed_exchanges=2)
    with pytest.raises(InfrastructureError) as e:
        boot("7-7.3", payloads / "mass-storage-gadget64", "cm4", rom_retries=1)
    assert e.value.stage == "usbboot.rom_transfer" and "rom_retries" in str(e.value)
    assert len(e.value.evidence["rom_attempts"]) == 2


def test_signed_boot_sends_bootcode_sig_to_a_cm3(module: Callable[..., Module], payloads: Path,
                                                 tmp_path: Path) -> None:
    """rpiboot -s (main.c:157-166, 598-609): the 20 bytes of bootcode.sig ride in the boot message."""
    _, journal = module("cm3", "7-7.4")
    folder = tmp_path / "signed"
    shutil.copytree(payloads / "msd", folder)
    with pytest.raises(InputError, match="bootcode.sig is missing"):
        boot("7-7.4", folder, "cm3", signed=True)
    assert not journal.events("bulk")
    (folder / "bootcode.sig").write_bytes(bytes(range(1, 21)) + b"tail")
    result = boot("7-7.4", folder, "cm3", signed=True)
    assert result.rom_attempts[0]["signed"] is True
    message = next(e for e in journal.events("bulk") if e.what == "boot-message")
    assert message.details["signed"] is True


def test_lingering_rom_is_not_sent_the_image_twice(module: Callable[..., Module], payloads: Path) -> None:
    """Section 3.3: the ROM stays ~1.5 s after its status. The host waits for a new enumeration instead
    of re-sending to the leaving ROM (which would time out), so one attempt suffices."""
    _, journal = module("cm3", "7-3.4", rom_double_sighting=True)
    result = boot("7-3.4", payloads / "msd", "cm3")
    assert [a["outcome"] for a in result.rom_attempts] == ["ok"]
    assert [s.name for s in result.stages].count("rom_transfer") == 1
    assert [e.details["status"] for e in journal.events("stage") if e.what == "rom-status"] == [0]
    second_stage_wait = next(s for s in result.stages if s.name == "second_stage")
    assert second_stage_wait.duration >= 1.5 / SPEEDUP
    assert not journal.events("fault")


@pytest.mark.parametrize("mode", ["stall", "timeout"])
def test_first_control_failure_is_retried_and_without_retries_a_typed_infrastructure_error(
        module: Callable[..., Module], payloads: Path, mode: str) -> None:
    module("cm4", "7-3.5", first_control=mode)
    with pytest.raises(InfrastructureError) as e:
        boot("7-3.5", payloads / "mass-storage-gadget64", "cm4", rom_retries=0)
    assert e.value.stage == "usbboot.rom_transfer"
    first = e.value.evidence["trace"]["transfers"][0]
    assert (first["kind"], first["value"], first["result"]) == ("control_out", 24, "pipe" if mode == "stall"
                                                                else "timeout")
    module("cm4", "7-7.5", first_control=mode)  # the second stage's first request fails too: read it again
    result = boot("7-7.5", payloads / "mass-storage-gadget64", "cm4", read_timeout=1.0)
    assert [a["outcome"] == "ok" for a in result.rom_attempts] == [False, True]


def test_slow_first_request_is_read_again(module: Callable[..., Module], payloads: Path) -> None:
    """A busy second stage does not complete the request read; a timed-out read is simply repeated."""
    # 2 s at this speed-up against 0.25 s reads: the first read times out even when a loaded host reaches it
    # 1.5 s after the second stage started its delay.
    _, journal = module("cm4", "7-3.6", request_delay=100.0)
    result = boot("7-3.6", payloads / "mass-storage-gadget64", "cm4", read_timeout=0.25)
    reads = [t.result for t in of_stage(result, "file_server") if t.kind == "control_in"]
    assert reads[0] == "timeout" and reads[-1] == "ok"
    assert result.final_identity is not None


def test_missing_mass_storage_is_a_product_error_not_a_hang(module: Callable[..., Module], payloads: Path) -> None:
    module("cm4", "7-3.7", no_mass_storage=True)
    with pytest.raises(ProductError) as e:
        boot("7-3.7", payloads / "mass-storage-gadget64", "cm4", timeouts={**TIMEOUTS, "mass_storage": 0.5})
    assert e.value.stage == "usbboot.mass_storage"
    assert e.value.evidence["trace"]["stages"][-2]["name"] == "file_server"


def test_empty_port_is_an_infrastructure_error(module: Callable[..., Module], payloads: Path) -> None:
    """A module on another port is never touched by a host bound to an empty one."""
    _, journal = module("cm4", "7-4.1")
    with pytest.raises(InfrastructureError) as e:
        boot("7-4.2", payloads / "mass-storage-gadget64", "cm4", timeouts={**TIMEOUTS, "rom": 0.3})
    assert e.value.stage == "usbboot.rom" and "7-4.2" in str(e.value)
    assert not journal.events("bulk")


def test_two_modules_boot_concurrently_each_through_its_own_port(module: Callable[..., Module],
                                                                 payloads: Path) -> None:
    ports = ("7-5.1", "7-5.2")
    journals = [module("cm4", port)[1] for port in ports]
    results: dict[str, UsbBootResult | BaseException] = {}

    def run(port: str) -> None:
        try:
            results[port] = boot(port, payloads / "mass-storage-gadget64", "cm4")
        except BaseException as e:  # reported below
            results[port] = e

    threads = [threading.Thread(target=run, args=(port,)) for port in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for port, journal in zip(ports, journals, strict=True):
        result = results[port]
        assert isinstance(result, UsbBootResult), result
        check_file_server(result, journal)
        assert all(e.details["port"] == port for e in journal.events("stage") if "port" in e.details)
    first, second = (results[p] for p in ports)
    assert isinstance(first, UsbBootResult) and isinstance(second, UsbBootResult)
    assert first.final_identity and second.final_identity
    assert first.final_identity.address != second.final_identity.address


def test_cli_boots_and_writes_json(module: Callable[..., Module], payloads: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    module("cm4", "7-6.1")
    out = tmp_path / "result.json"
    code = hil_main(["usbboot", "--port", "7-6.1", "--payload", str(payloads / "mass-storage-gadget64"),
                     "--model", "cm4", "--settle", "0.01", "--timeout", "file_server=10", "--json", str(out)])
    assert code == 0
    shown = capsys.readouterr().out
    assert "rom_transfer ok" in shown and "file boot.img: 1.0 MiB" in shown and "0a5c:0104" in shown
    assert json.loads(out.read_text())["final_identity"]["pid"] == "0104"


def test_cli_exit_codes_follow_the_fault(module: Callable[..., Module], payloads: Path, tmp_path: Path) -> None:
    module("cm4", "7-6.2", rom_status=7)
    out = tmp_path / "failure.json"
    args = ["usbboot", "--port", "7-6.2", "--model", "cm4", "--settle", "0.01", "--quiet", "--json", str(out)]
    assert hil_main([*args, "--payload", str(tmp_path / "missing")]) == 2
    assert hil_main([*args, "--payload", str(payloads / "mass-storage-gadget64")]) == 4
    failure = json.loads(out.read_text())
    assert (failure["stage"], failure["fault"]) == ("usbboot.rom_transfer", "product")
    assert hil_main([*args, "--port", "7-6.3", "--payload", str(payloads / "msd"), "--timeout", "rom=0.2"]) == 3


@pytest.fixture(scope="module")
def genuine_payloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folders shaped like usbboot's own msd and mass-storage-gadget64 (tests/genuine_shapes.py)."""
    root = tmp_path_factory.mktemp("genuine")
    msd_folder(root)
    gadget_folder(root)
    return root


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


GENUINE_BOOTS = [("cm1", "msd", "0001"), ("cm3", "msd", "0001"), ("cm4", "msd", "0001"),
                 ("cm4", "mass-storage-gadget64", "0104"), ("cm5", "mass-storage-gadget64", "0104")]


@pytest.mark.parametrize(("name", "kind", "final_pid"), GENUINE_BOOTS)
def test_raspberry_pis_own_payload_folders_boot_through_hil_usbboot(
        module: Callable[..., Module], genuine_payloads: Path, tmp_path: Path, name: str, kind: str,
        final_pid: str) -> None:
    """The virtual module runs a genuine-shaped second stage as the payload it is: msd becomes the mass-storage
    device 0a5c:0001, mass-storage-gadget64 boots boot.img and becomes the gadget 0a5c:0104."""
    port = f"7-2.{GENUINE_BOOTS.index((name, kind, final_pid)) + 1}"
    _, journal = module(name, port)
    out = tmp_path / "result.json"
    assert hil_main(["usbboot", "--port", port, "--payload", str(genuine_payloads / kind), "--model", name,
                     "--settle", "0.01", "--timeout", "file_server=20", "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["final_identity"]["pid"] == final_pid
    genuine = [e.details for e in journal.events("stage") if e.what == "genuine second stage"]
    assert [(g["chip"], g["program"]) for g in genuine] == [
        (MODELS[name].chip_dir, "msd" if kind == "msd" else "gadget")]
    assert not journal.events("fault")


@pytest.mark.parametrize(("name", "kind", "final_pid"), GENUINE_BOOTS)
def test_a_plain_libusb_client_that_closes_without_releasing_boots_them(
        bus: UsbBus, module: Callable[..., Module], genuine_payloads: Path, name: str, kind: str,
        final_pid: str) -> None:
    """rpiboot's way with handles: each pass closes without libusb_release_interface, the next claims again."""
    port = f"7-3.{GENUINE_BOOTS.index((name, kind, final_pid)) + 1}"
    side, journal = module(name, port)
    client = Path(__file__).with_name("plain_rpiboot.py")
    done = subprocess.run([sys.executable, str(client), port, str(genuine_payloads / kind)], env=bus.child_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["status"] == 0 and got["chip"] == MODELS[name].chip_dir
    if kind == "mass-storage-gadget64":
        assert [n for n, _ in got["served"]][-1] == "boot.img"
    assert wait_for(lambda: side.state == "mass-storage")
    device = bus.port(port).attached
    assert device is not None and f"{device.identity.vid:04x}:{device.identity.pid:04x}" == f"0a5c:{final_pid}"
    assert not journal.events("fault")


def test_genuine_shaped_recovery_flashes_the_eeprom(module: Callable[..., Module], payloads: Path,
                                                    tmp_path: Path) -> None:
    """recovery/: a recovery.bin-shaped bootcode4.bin runs the EEPROM flow and reports its metadata."""
    folder = tmp_path / "recovery"
    shutil.copytree(payloads / "recovery", folder)
    (folder / "bootcode4.bin").write_bytes(recovery_bin("2711"))
    _, journal = module("cm4", "7-4.1")
    result = boot("7-4.1", folder, "cm4")
    assert result.metadata["EEPROM_UPDATE"] == "success"
    assert [e.details["program"] for e in journal.events("stage") if e.what == "genuine second stage"] == ["recovery"]


def test_genuine_shaped_bytes_for_another_chip_or_kind_are_refused(module: Callable[..., Module],
                                                                   genuine_payloads: Path, tmp_path: Path) -> None:
    """A CM5 sent a 2711 second stage, or a second stage of no modelled kind, answers a non-zero status."""
    _, journal = module("cm5", "7-4.2")
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "bootcode5.bin").write_bytes((genuine_payloads / "msd" / "bootcode4.bin").read_bytes())
    with pytest.raises(ProductError):
        boot("7-4.2", folder, "cm5", timeouts={**TIMEOUTS, "rom_transfer": 1.0})
    assert [e.what for e in journal.events("fault")][-1] == "second stage for another chip"


def test_a_boot_img_that_is_no_fat_image_is_not_booted(module: Callable[..., Module], genuine_payloads: Path,
                                                       tmp_path: Path) -> None:
    """The gadget's boot.img is a FAT image (rpi-make-boot-image); other bytes leave the module halted."""
    folder = tmp_path / "mass-storage-gadget64"
    shutil.copytree(genuine_payloads / "mass-storage-gadget64", folder)
    (folder / "boot.img").write_bytes(bytes(512) + os.urandom(1024 * 1024))
    side, journal = module("cm5", "7-4.3")
    with pytest.raises(ProductError):
        boot("7-4.3", folder, "cm5")
    assert "boot.img is not a FAT image" in [e.what for e in journal.events("fault")]
    assert side.state != "mass-storage"


def test_cli_reports_the_rom_exchanges_and_takes_the_retries(module: Callable[..., Module], payloads: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    module("cm4", "7-8.1", rom_odd_status=0x42)
    args = ["usbboot", "--port", "7-8.1", "--model", "cm4", "--settle", "0.01", "--quiet",
            "--payload", str(payloads / "mass-storage-gadget64")]
    assert hil_main(args) == 0
    assert "ROM exchange 1: status 0x42" in capsys.readouterr().out
    module("cm4", "7-8.2", rom_failed_exchanges=1)
    assert hil_main([*args[:2], "7-8.2", *args[3:], "--rom-retries", "0"]) == 3
