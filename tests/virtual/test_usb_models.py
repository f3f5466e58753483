"""The virtual module's USB device models, driven directly through their transfer methods.

A tiny in-test host plays rpiboot's side of usbboot-protocol.md sections 2-4 against whatever the
orchestrator has attached to a recording bus port, so these tests need neither umockdev nor libusb.
"""

from __future__ import annotations

import hashlib
import struct
import tarfile
import threading
from pathlib import Path

import pytest

from hil.errors import InputError
from hil.models import MODELS, ModuleModel
from hil.usbboot.fileserver import Payload
from hil.virtual.journal import Journal
from hil.virtual.timing import DeviceClock
from hil.virtual.usb import bootrom
from hil.virtual.usb.device import (
    BlockChild,
    Cancelled,
    ControlSetup,
    DeviceGone,
    Stall,
    Unresponsive,
    UsbDeviceModel,
)
from hil.virtual.usb.payloads import EEPROM_SIZE, eeprom_sig, make_payload, read_stand_in, stand_in
from hil.virtual.usb.side import VirtualUsb
from hil.virtual.usb.switches import DeviceEnv, UsbSwitches, default_switches, parse_switches
from tests.genuine_shapes import second_stage as genuine_second_stage

SPEEDUP = 1000.0
EMMC = "/dev/loop-test"
EMMC_SIZE = 64 * 1024 * 1024
BOOT_IMG = 256 * 1024  # a small ramdisk keeps the tests fast; the exchange is the same


class Timeout(Exception):
    """What the host's libusb would report as LIBUSB_ERROR_TIMEOUT."""


class RecordingPort:
    """A bus port that keeps what is attached and what happened to it."""

    def __init__(self, port: str = "1-1.4"):
        self.port = port
        self.device: UsbDeviceModel | None = None
        self.history: list[str] = []
        self.disk_updates: list[tuple[BlockChild, ...]] = []
        self._cond = threading.Condition()

    def attach(self, device: UsbDeviceModel) -> None:
        with self._cond:
            self.device = device
            self.history.append(f"attach {device.identity.pid:04x}")
            self._cond.notify_all()

    def detach(self) -> None:
        with self._cond:
            self.device = None
            self.history.append("detach")
            self._cond.notify_all()

    def update_disks(self, disks: tuple[BlockChild, ...]) -> None:
        with self._cond:
            self.disk_updates.append(disks)
            self._cond.notify_all()

    def wait_for(self, pid: int, timeout: float = 5.0) -> UsbDeviceModel:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.device is not None and self.device.identity.pid == pid,
                                     timeout)
            assert ok and self.device is not None, f"no {pid:04x} on {self.port}: {self.history}"
            return self.device


def _call(fn, *args, timeout: float):
    cancel = threading.Event()
    timer = threading.Timer(timeout, cancel.set)
    timer.start()
    try:
        return fn(*args, cancel)
    except (Unresponsive, Cancelled):
        raise Timeout() from None
    finally:
        timer.cancel()


def announce(dev: UsbDeviceModel, n: int) -> None:
    _call(dev.control, ControlSetup(0x40, 0, n & 0xFFFF, n >> 16, 0), b"", timeout=1.0)


def read(dev: UsbDeviceModel, n: int, timeout: float = 2.0) -> bytes:
    return _call(dev.control, ControlSetup(0xC0, 0, n & 0xFFFF, n >> 16, n), b"", timeout=timeout)


def write(dev: UsbDeviceModel, data: bytes, endpoint: int = 0x01) -> None:
    announce(dev, len(data))
    for i in range(0, len(data), 16384):
        assert _call(dev.bulk_out, endpoint, data[i:i + 16384], timeout=1.0) == len(data[i:i + 16384])


def send_bootcode(rom: UsbDeviceModel, image: bytes) -> int:
    write(rom, struct.pack("<i20s", len(image), b""))
    write(rom, image)
    return struct.unpack("<I", read(rom, 4))[0]


def lookup(payload: Path, model: ModuleModel, name: str) -> bytes | None:
    found = Payload(payload, model).find(name)
    return found.data if found else None


def serve(dev: UsbDeviceModel, payload: Path, model: ModuleModel,
          timeout: float = 2.0) -> list[tuple[int, str]]:
    """rpiboot's file_server() loop (section 4.2) until Done."""
    asked: list[tuple[int, str]] = []
    current: bytes | None = None
    while True:
        req = read(dev, 260, timeout)
        command = struct.unpack_from("<i", req)[0]
        name = req[4:].split(b"\0", 1)[0].decode()
        asked.append((command, name))
        if name.startswith("*") and command != 2:
            announce(dev, 0)
        elif command == 0:
            current = lookup(payload, model, name)
            announce(dev, len(current or b""))
        elif command == 1:
            write(dev, current or b"")
        else:
            return asked


def second_stage_of(payload: Path, model: ModuleModel) -> bytes:
    data = lookup(payload, model, model.second_stage)
    assert data is not None
    return data


@pytest.fixture
def journal() -> Journal:
    return Journal()


def make_env(model: ModuleModel, journal: Journal, **switches: object) -> DeviceEnv:
    sw = UsbSwitches(**{**default_switches(model).__dict__, **switches})
    return DeviceEnv(model, sw, DeviceClock(SPEEDUP), journal, "af04b2da")


def make_side(model: ModuleModel, journal: Journal, port: RecordingPort, extra=None, **switches: object):
    sw = UsbSwitches(**{**default_switches(model).__dict__, **switches})
    return VirtualUsb(model, port, EMMC, EMMC_SIZE, sw, DeviceClock(SPEEDUP), journal, extra)


def faults(journal: Journal) -> list[str]:
    return [e.what for e in journal.events("fault")]


# --- descriptors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, pid, iserial, product, speed", [
    ("cm1", 0x2763, 0, "BCM2708 Boot", "full"), ("cm3", 0x2764, 0, "BCM2710 Boot", "high"),
    ("cm4", 0x2711, 3, "BCM2711 Boot", "high"), ("cm5", 0x2712, 3, "BCM2712D0 Boot", "high")])
def test_rom_identity_per_model(journal, name, pid, iserial, product, speed):
    rom = bootrom.BootRom(make_env(MODELS[name], journal))
    ident = rom.identity
    assert (ident.vid, ident.pid, ident.iserial, ident.speed) == (0x0A5C, pid, iserial, speed)
    assert ident.strings[2] == product
    assert (iserial in ident.strings) == bool(iserial)


def config_read(dev: UsbDeviceModel, length: int = 255) -> bytes:
    return dev.control(ControlSetup(0x80, 6, 0x0200, 0, length), b"", threading.Event())


def test_config_55_32_first_read_claims_two_interfaces(journal):
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal, config_55_32=True))
    first, second, third = config_read(rom, 9), config_read(rom), config_read(rom)
    assert struct.unpack_from("<H", first, 2)[0] == 55 and first[4] == 2
    assert len(second) == 32 and second[4] == 1 and second == third == rom.identity.config_descriptors[0]


def test_config_without_quirk_is_consistent(journal):
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal, config_55_32=False))
    assert config_read(rom, 9) == config_read(rom)[:9] and config_read(rom)[4] == 1


def test_full_speed_rom_declares_512_byte_bulk_and_ep2_out(journal):
    assert default_switches(MODELS["cm1"]).full_speed and not default_switches(MODELS["cm4"]).full_speed
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal, full_speed=True))
    config = rom.identity.config_descriptors[0]
    endpoints = [config[i:i + 7] for i in range(18, len(config), 7)]
    assert rom.identity.speed == "full"
    assert [(e[2], struct.unpack_from("<H", e, 4)[0]) for e in endpoints] == [(0x01, 512), (0x02, 512)]


def test_standard_requests(journal):
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal))
    lang = rom.control(ControlSetup(0x80, 6, 0x0300, 0, 255), b"", threading.Event())
    serial = rom.control(ControlSetup(0x80, 6, 0x0303, 0x0409, 255), b"", threading.Event())
    assert lang == b"\x04\x03\x09\x04" and serial[2:].decode("utf-16-le") == "af04b2da"
    assert rom.control(ControlSetup(0x80, 0, 0, 0, 2), b"", threading.Event()) == b"\x01\x00"  # self-powered
    with pytest.raises(Stall):
        rom.control(ControlSetup(0x80, 6, 0x0399, 0x0409, 255), b"", threading.Event())


# --- boot ROM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [("cm1", "msd"), ("cm3", "msd"), ("cm4", "mass-storage-gadget64"),
                                        ("cm5", "recovery5")])
def test_rom_accepts_its_own_second_stage(tmp_path, journal, name, kind):
    model = MODELS[name]
    payload = make_payload(tmp_path, kind, (name,))
    rom = bootrom.BootRom(make_env(model, journal))
    image = second_stage_of(payload, model)
    assert send_bootcode(rom, image) == bootrom.STATUS_OK
    result = rom.wait_result()
    assert result is not None and result.program is not None and result.program.chip == model.chip_dir
    assert [(e.what, e.details["bytes"]) for e in journal.events("bulk")] == \
        [("boot-message", 24), (model.second_stage, len(image))]


def test_rom_rejects_other_chips_and_bytes_that_are_no_second_stage(tmp_path, journal):
    rom = bootrom.BootRom(make_env(MODELS["cm5"], journal))
    cm4_image = second_stage_of(make_payload(tmp_path, "recovery"), MODELS["cm4"])
    assert send_bootcode(rom, cm4_image) == bootrom.STATUS_REJECTED
    assert send_bootcode(rom, b"\x7fELF" + bytes(60_000)) == bootrom.STATUS_REJECTED
    assert faults(journal) == ["second stage for another chip", "not a second stage"]


@pytest.mark.parametrize("chip, kind, program", [("2710", "loader", "msd"), ("2711", "msd", "msd"),
                                                 ("2711", "recovery", "recovery"), ("2712", "bootfiles", "gadget")])
def test_rom_runs_a_genuine_shaped_second_stage_as_the_program_it_is(journal, chip, kind, program):
    model = next(m for m in MODELS.values() if m.chip_dir == chip and m.name != "cm3")
    rom = bootrom.BootRom(make_env(model, journal))
    assert send_bootcode(rom, genuine_second_stage(chip, kind, 60_000)) == bootrom.STATUS_OK
    result = rom.wait_result()
    assert result is not None and result.program is not None
    assert (result.program.chip, result.program.program, result.program.genuine) == (chip, program, True)


def test_rom_refuses_genuine_shapes_it_cannot_run(journal):
    """A genuine structure without the strings of a modelled kind, or with one zero byte less of header block
    (code at 0x1ff), or without its product string, is refused."""
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal))
    image = genuine_second_stage("2711", "msd", 60_000)
    no_kind = image.replace(b"USB-MSD", b"USB_XYZ").replace(b"Verify BOOT EEPROM", b"Verify BOOT XXXXXX")
    assert send_bootcode(rom, no_kind) == bootrom.STATUS_REJECTED
    assert send_bootcode(rom, image[:0x1FF] + b"\x01" + image[0x200:]) == bootrom.STATUS_REJECTED
    assert send_bootcode(rom, image.replace("BCM2711 Boot".encode("utf-16-le"), bytes(24))) == bootrom.STATUS_REJECTED
    assert faults(journal) == ["a Raspberry Pi second stage of a kind not modelled", "not a second stage",
                               "not a second stage"]


def test_rom_wrong_length_gives_bad_status_then_retry_works(tmp_path, journal):
    model = MODELS["cm4"]
    image = second_stage_of(make_payload(tmp_path, "recovery"), model)
    rom = bootrom.BootRom(make_env(model, journal))
    write(rom, struct.pack("<i20s", len(image) + 4, b""))
    announce(rom, len(image))  # differs from the boot message
    with pytest.raises(Timeout):  # nothing announced that the ROM accepted: bulk is NAKed
        _call(rom.bulk_out, 0x01, image[:512], timeout=0.1)
    assert struct.unpack("<I", read(rom, 4))[0] == bootrom.STATUS_BAD_EXCHANGE
    assert send_bootcode(rom, image) == bootrom.STATUS_OK
    assert "image length differs from boot message" in faults(journal)


def test_rom_contract_violations(tmp_path, journal):
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal))
    with pytest.raises(Timeout):
        _call(rom.bulk_out, 0x01, b"x" * 24, timeout=0.1)  # bulk before any announce
    announce(rom, 24)
    with pytest.raises(Stall):
        _call(rom.bulk_out, 0x01, b"x" * 64, timeout=0.1)  # more than announced
    with pytest.raises(Stall):
        read(rom, 8)  # the status is 4 bytes
    assert struct.unpack("<I", read(rom, 4))[0] == bootrom.STATUS_BAD_EXCHANGE
    with pytest.raises(Timeout):
        read(rom, 4, timeout=0.1)  # nothing to report before an exchange


def test_rom_empty_second_stage_means_no_second_stage(journal):
    rom = bootrom.BootRom(make_env(MODELS["cm3"], journal))
    write(rom, struct.pack("<i20s", 0, b""))
    announce(rom, 0)
    assert struct.unpack("<I", read(rom, 4))[0] == bootrom.STATUS_NO_IMAGE
    assert faults(journal) == ["empty second stage"]


def test_rom_accepts_big_endian_length_and_notes_it(tmp_path, journal):
    model = MODELS["cm3"]
    image = second_stage_of(make_payload(tmp_path, "msd", ("cm3",)), model)
    rom = bootrom.BootRom(make_env(model, journal))
    write(rom, struct.pack(">i20s", len(image), b""))
    write(rom, image)
    assert struct.unpack("<I", read(rom, 4))[0] == bootrom.STATUS_OK
    assert "big-endian length in boot message" in faults(journal)


# --- payloads -----------------------------------------------------------------------------------------


def test_payload_layouts(tmp_path):
    assert sorted(p.name for p in make_payload(tmp_path, "msd").iterdir()) == \
        ["bootcode.bin", "bootcode4.bin", "start.elf", "start4.elf"]
    gadget = make_payload(tmp_path, "mass-storage-gadget64", boot_img_size=BOOT_IMG)
    with tarfile.open(gadget / "bootfiles.bin") as tar:
        names = set(tar.getnames())
    assert {"2711/bootcode4.bin", "2711/memsys08.bin", "2711/bootmain", "2712/bootcode5.bin",
            "2712/memsys03.bin", "2712/mcb.bin"} <= names
    assert "boot_ramdisk=1" in (gadget / "config.txt").read_text()
    assert (gadget / "boot.img").stat().st_size == BOOT_IMG
    recovery = make_payload(tmp_path, "recovery")
    image = (recovery / "pieeprom.bin").read_bytes()
    sig = (recovery / "pieeprom.sig").read_text().splitlines()
    assert len(image) == EEPROM_SIZE["2711"] and sig == [hashlib.sha256(image).hexdigest(), "ts: 1700000000"]
    header = read_stand_in((recovery / "bootcode4.bin").read_bytes())
    assert header is not None and (header.chip, header.program) == ("2711", "recovery")
    with pytest.raises(InputError):
        make_payload(tmp_path, "usb-boot")


# --- second stage: whole chains through the orchestrator ----------------------------------------------


def boot_to_second_stage(side: VirtualUsb, port: RecordingPort, payload: Path) -> UsbDeviceModel:
    model = side.model
    side.power_on(usb_boot=True)
    rom = port.wait_for(model.rom_pid)
    assert send_bootcode(rom, second_stage_of(payload, model)) == 0
    if model.stage2_pid == model.rom_pid:
        with port._cond:
            port._cond.wait_for(lambda: port.device is not rom, 5)
    return port.wait_for(model.stage2_pid)


def files_asked(asked: list[tuple[int, str]]) -> list[str]:
    return [name for command, name in asked if command == 0 and not name.startswith("*")]


@pytest.mark.parametrize("name", ["cm1", "cm4"])
def test_msd_chain_ends_as_mass_storage(tmp_path, journal, name):
    model, port = MODELS[name], RecordingPort()
    side = make_side(model, journal, port)
    try:
        stage2 = boot_to_second_stage(side, port, make_payload(tmp_path, "msd", (name,)))
        assert stage2.identity.iserial == model.stage2_iserial
        asked = serve(stage2, tmp_path / "msd", model)
        start = "start.elf" if name == "cm1" else "start4.elf"
        assert start in files_asked(asked) and (1, start) in asked and asked[-1][0] == 2
        msd = port.wait_for(0x0001)
        assert msd.identity.disks == (BlockChild(EMMC, EMMC_SIZE, "RPi-MSD-", "0001"),)
        with pytest.raises(Stall):
            msd.bulk_out(0x01, b"USBC", threading.Event())
    finally:
        side.power_off()
    assert port.device is None and side.state == "off"
    assert journal.stages()[:2] == ["rom", "rom-status"] and "mass-storage" in journal.stages()


def test_msd_without_start_elf_never_becomes_mass_storage(tmp_path, journal):
    model, port = MODELS["cm3"], RecordingPort()
    payload = make_payload(tmp_path, "msd", ("cm3",))
    (payload / "start.elf").unlink()
    side = make_side(model, journal, port)
    try:
        serve(boot_to_second_stage(side, port, payload), payload, MODELS["cm3"])
        _wait(lambda: side.state == "halted")
        assert port.device is not None and port.device.identity.pid == model.stage2_pid
        assert "no firmware" in faults(journal)
    finally:
        side.power_off()


def _wait(predicate, timeout: float = 5.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize("name, memsys", [("cm4", 9), ("cm5", 4)])
def test_gadget_chain_asks_in_order_and_becomes_0104(tmp_path, journal, name, memsys):
    model, port = MODELS[name], RecordingPort()
    payload = make_payload(tmp_path, "mass-storage-gadget64", (name,), boot_img_size=BOOT_IMG)
    side = make_side(model, journal, port)
    try:
        asked = serve(boot_to_second_stage(side, port, payload), payload, model)
        assert files_asked(asked) == ["mcb.bin", *(f"memsys{i:02d}.bin" for i in range(memsys)), "bootmain",
                                      "config.txt", "boot.img"]
        gadget = port.wait_for(0x0104)
        assert gadget.identity.strings[1] == "Raspberry Pi" and gadget.identity.disks[0].size == EMMC_SIZE
        assert {e.what: e.details["size"] for e in journal.events("file")}["boot.img"] == BOOT_IMG
    finally:
        side.power_off()


def test_gadget_without_boot_img_halts(tmp_path, journal):
    model, port = MODELS["cm4"], RecordingPort()
    payload = make_payload(tmp_path, "mass-storage-gadget64", ("cm4",), boot_img_size=BOOT_IMG)
    (payload / "boot.img").unlink()
    side = make_side(model, journal, port)
    try:
        serve(boot_to_second_stage(side, port, payload), payload, MODELS["cm4"])
        _wait(lambda: side.state == "halted")
        assert "no boot.img" in faults(journal)
    finally:
        side.power_off()


@pytest.mark.parametrize("tamper, update", [(False, "success"), (True, "failed")])
def test_recovery_reports_metadata_and_stays(tmp_path, journal, tamper, update):
    model, port = MODELS["cm4"], RecordingPort()
    payload = make_payload(tmp_path, "recovery")
    image = (payload / "pieeprom.bin").read_bytes()
    if tamper:
        (payload / "pieeprom.bin").write_bytes(image[:-1] + b"\x00")
    side = make_side(model, journal, port)
    try:
        asked = serve(boot_to_second_stage(side, port, payload), payload, MODELS["cm4"])
        metadata = dict(name[1:].split("*", 1) for command, name in asked if name.startswith("*"))
        assert metadata["EEPROM_UPDATE"] == update
        assert (metadata["EEPROM_HASH"] == hashlib.sha256(image).hexdigest()) is not tamper
        assert {e.what: e.details["value"] for e in journal.events("metadata")} == metadata
        _wait(lambda: side.state == "recovery")
        assert port.device is not None and port.history[-1] == "attach 2711"
    finally:
        side.power_off()
    assert (side.eeprom == image) is not tamper


def test_recovery_reboot_leaves_the_bus(tmp_path, journal):
    payload = make_payload(tmp_path, "recovery5")
    (payload / "config.txt").write_text("recovery_reboot=1\nrecovery_metadata=0\n")
    port = RecordingPort()
    side = make_side(MODELS["cm5"], journal, port)
    try:
        asked = serve(boot_to_second_stage(side, port, payload), payload, MODELS["cm5"])
        assert not [name for _, name in asked if name.startswith("*")]
        _wait(lambda: side.state == "rebooted")
        assert port.device is None
    finally:
        side.power_off()


def test_no_usb_boot_puts_nothing_on_the_bus(journal):
    port = RecordingPort()
    side = make_side(MODELS["cm4"], journal, port)
    side.power_on(usb_boot=False)
    threading.Event().wait(0.05)
    side.power_off()
    assert port.history == [] and journal.stages() == []


def test_power_off_mid_request_ends_everything(tmp_path, journal):
    port = RecordingPort()
    side = make_side(MODELS["cm4"], journal, port, request_delay=100.0)
    payload = make_payload(tmp_path, "mass-storage-gadget64", ("cm4",), boot_img_size=BOOT_IMG)
    stage2 = boot_to_second_stage(side, port, payload)
    side.power_off()
    assert port.device is None and side._thread is None
    with pytest.raises(DeviceGone):
        read(stage2, 260)


# --- switches ------------------------------------------------------------------------------------------


def test_switch_defaults_follow_the_model():
    assert parse_switches({}, MODELS["cm4"]) == default_switches(MODELS["cm4"])
    assert default_switches(MODELS["cm4"]).config_55_32 and not default_switches(MODELS["cm5"]).config_55_32
    sw = parse_switches({"rom_status": 5, "request_delay": 25, "duplicate_disk": "1-1.5"}, MODELS["cm1"])
    assert (sw.rom_status, sw.request_delay, sw.duplicate_disk, sw.full_speed) == (5, 25.0, "1-1.5", True)


@pytest.mark.parametrize("raw, key", [
    ({"first_contrl": "stall"}, "first_contrl"), ({"first_control": "hang"}, "first_control"),
    ({"full_speed": "yes"}, "full_speed"), ({"rom_status": 0}, "rom_status"),
    ({"truncated_bulk": 1.5}, "truncated_bulk"), ({"late_disk": -1}, "late_disk"),
    ({"duplicate_disk": "sdb"}, "duplicate_disk")])
def test_bad_switches_name_key_and_fix(raw, key):
    with pytest.raises(InputError) as info:
        parse_switches(raw, MODELS["cm4"], "rigs/x.toml")
    message = str(info.value)
    assert info.value.stage == "rig-file" and f"virtual.usb.{key}" in message and "Fix:" in message


@pytest.mark.parametrize("mode, error", [("stall", Stall), ("timeout", Timeout)])
def test_first_control_fails_once_per_stage(tmp_path, journal, mode, error):
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal, first_control=mode))
    with pytest.raises(error):
        announce(rom, 24)
    image = second_stage_of(make_payload(tmp_path, "recovery"), MODELS["cm4"])
    assert send_bootcode(rom, image) == 0


def test_rom_status_switch(tmp_path, journal):
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal, rom_status=0x42))
    image = second_stage_of(make_payload(tmp_path, "recovery"), MODELS["cm4"])
    assert send_bootcode(rom, image) == 0x42 and send_bootcode(rom, image) == 0x42


def test_truncated_bulk_switch(tmp_path, journal):
    rom = bootrom.BootRom(make_env(MODELS["cm4"], journal, truncated_bulk=24 + 16384))
    image = second_stage_of(make_payload(tmp_path, "recovery"), MODELS["cm4"])
    write(rom, struct.pack("<i20s", len(image), b""))
    announce(rom, len(image))
    _call(rom.bulk_out, 0x01, image[:16384], timeout=0.1)
    with pytest.raises(Timeout):
        _call(rom.bulk_out, 0x01, image[16384:32768], timeout=0.1)
    assert "truncated_bulk" in faults(journal)


def test_disconnect_at_drops_off_then_rom_returns(tmp_path, journal):
    port = RecordingPort()
    side = make_side(MODELS["cm4"], journal, port, disconnect_at=20_000)
    image = second_stage_of(make_payload(tmp_path, "recovery"), MODELS["cm4"])
    try:
        side.power_on(usb_boot=True)
        rom = port.wait_for(0x2711)
        write(rom, struct.pack("<i20s", len(image), b""))
        with pytest.raises(DeviceGone):
            write(rom, image)
        _wait(lambda: port.history[-2:] == ["detach", "attach 2711"])
        assert send_bootcode(port.wait_for(0x2711), image) == 0
    finally:
        side.power_off()
    assert "disconnect_at" in faults(journal)


def test_rom_double_sighting_switch(tmp_path, journal):
    port = RecordingPort()
    side = make_side(MODELS["cm4"], journal, port, rom_double_sighting=True)
    image = second_stage_of(make_payload(tmp_path, "recovery"), MODELS["cm4"])
    side.clock = DeviceClock(10.0)  # the 1.5 s linger lasts 0.15 s
    side.power_on(usb_boot=True)
    try:
        rom = port.wait_for(0x2711)
        assert send_bootcode(rom, image) == 0
        assert port.device is rom
        with pytest.raises(Timeout):  # the host comes round again and re-sends: (-7,24)
            announce(rom, 24)
        _wait(lambda: port.device is not rom and "detach" in port.history)
    finally:
        side.power_off()


def test_request_delay_outlasts_the_host_timeout(tmp_path, journal):
    port = RecordingPort()
    side = make_side(MODELS["cm4"], journal, port, request_delay=100.0)  # 0.1 s here
    payload = make_payload(tmp_path, "mass-storage-gadget64", ("cm4",), boot_img_size=BOOT_IMG)
    try:
        stage2 = boot_to_second_stage(side, port, payload)
        with pytest.raises(Timeout):
            read(stage2, 260, timeout=0.02)
        assert read(stage2, 260, timeout=2.0)[4:11] == b"mcb.bin"
    finally:
        side.power_off()


@pytest.mark.parametrize("switch, state", [("no_detach_after_done", "stuck-after-done"),
                                           ("no_mass_storage", "no-mass-storage")])
def test_after_done_switches(tmp_path, journal, switch, state):
    port = RecordingPort()
    side = make_side(MODELS["cm3"], journal, port, **{switch: True})
    payload = make_payload(tmp_path, "msd", ("cm3",))
    try:
        serve(boot_to_second_stage(side, port, payload), payload, MODELS["cm3"])
        _wait(lambda: side.state == state)
        assert (port.device is not None) == (switch == "no_detach_after_done")
        assert "attach 0001" not in port.history
    finally:
        side.power_off()


def test_late_disk_and_duplicate_disk(tmp_path, journal):
    port, extra = RecordingPort(), RecordingPort("1-1.5")
    side = make_side(MODELS["cm3"], journal, port, lambda path: extra, late_disk=50.0, duplicate_disk="1-1.5")
    payload = make_payload(tmp_path, "msd", ("cm3",))
    try:
        serve(boot_to_second_stage(side, port, payload), payload, MODELS["cm3"])
        msd = port.wait_for(0x0001)
        assert msd.identity.disks[0].size == 0
        assert extra.wait_for(0x0001).identity.disks[0].target == EMMC
        _wait(lambda: bool(port.disk_updates))
        assert port.disk_updates == [(BlockChild(EMMC, EMMC_SIZE, "RPi-MSD-", "0001"),)]
    finally:
        side.power_off()
    assert port.device is None and extra.device is None


def test_duplicate_disk_needs_a_bus_with_ports(journal):
    with pytest.raises(InputError):
        make_side(MODELS["cm4"], journal, RecordingPort(), duplicate_disk="1-1.5")


def test_stand_in_is_deterministic():
    assert stand_in("2711", "msd", "x", 4096) == stand_in("2711", "msd", "x", 4096)
    assert eeprom_sig(b"abc").startswith(hashlib.sha256(b"abc").hexdigest().encode())
