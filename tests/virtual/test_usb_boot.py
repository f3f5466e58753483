"""The virtual module's USB side end to end: umockdev bus, real libusb, plain pyusb in a child process.

The host here is a minimal rpiboot following usbboot-protocol.md section 10.1 (the framework's own host
is tested elsewhere); it runs as a child of the test process, as rpiboot would, and reads the final
disk through the ``/dev/sdX`` node the bus gives the mass-storage device.
Run under ``umockdev-wrapper`` (the tests skip without its preload library).
This file doubles as the host program: ``python test_usb_boot.py list|boot ...``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROM_PIDS = (0x2763, 0x2764, 0x2711, 0x2712)
MIB = 1024 * 1024


# --- the host (child process) -----------------------------------------------------------------------


def _on_port(port: str, want: Any = None) -> list[Any]:
    import usb.core

    found = []
    for dev in usb.core.find(find_all=True, idVendor=0x0A5C):
        path = f"{dev.bus}-{'.'.join(map(str, dev.port_numbers or ()))}"
        if path == port and (want is None or want(dev)):
            found.append(dev)
    return found


def _wait_on_port(port: str, want: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _on_port(port, want)
        if found:
            return found[0]
        time.sleep(0.01)
    raise SystemExit(f"nothing matching on {port} within {timeout} s")


def _describe(dev: Any) -> dict[str, Any]:
    import usb.util

    serial = usb.util.get_string(dev, dev.iSerialNumber) if dev.iSerialNumber else None
    config_reads = [bytes(dev.ctrl_transfer(0x80, 6, 0x0200, 0, 255)) for _ in range(2)]
    return {"id": f"{dev.idVendor:04x}:{dev.idProduct:04x}", "iserial": dev.iSerialNumber, "serial": serial,
            "speed": dev.speed, "interfaces": dev.get_active_configuration().bNumInterfaces,
            "config_reads": [(struct.unpack_from("<H", c, 2)[0], c[4]) for c in config_reads]}


class _Link:
    """rpiboot's ep_write / ep_read on one opened device."""

    def __init__(self, dev: Any):
        import usb.util

        self.dev = dev
        interfaces = dev.get_active_configuration().bNumInterfaces
        interface, self.out_ep = (0, 0x01) if interfaces == 1 else (1, 0x03)
        usb.util.claim_interface(dev, interface)

    def announce(self, n: int) -> None:
        self.dev.ctrl_transfer(0x40, 0, n & 0xFFFF, n >> 16, None, 1000)

    def write(self, data: bytes) -> None:
        self.announce(len(data))
        for i in range(0, len(data), 16384):
            self.dev.write(self.out_ep, data[i:i + 16384], 5000)

    def read(self, n: int) -> bytes:
        return bytes(self.dev.ctrl_transfer(0xC0, 0, n & 0xFFFF, n >> 16, n, 5000))

    def close(self) -> None:
        import usb.util

        usb.util.dispose_resources(self.dev)


def _boot(port: str, payload: Path, model_name: str, read_bytes: int) -> dict[str, Any]:
    from hil.models import MODELS
    from hil.usbboot.fileserver import Payload

    files = Payload(payload, MODELS[model_name])
    rom = _wait_on_port(port, lambda d: d.idProduct in ROM_PIDS and d.iSerialNumber in (0, 3), 10)
    link = _Link(rom)
    image = files.second_stage().data
    link.write(struct.pack("<i20s", len(image), b""))
    link.write(image)
    status = struct.unpack("<I", link.read(4))[0]
    link.close()
    stage2 = _wait_on_port(port, lambda d: d.idProduct in ROM_PIDS and d.iSerialNumber not in (0, 3), 10)
    link, asked, current = _Link(stage2), [], None
    while True:
        req = link.read(260)
        command, name = struct.unpack_from("<i", req)[0], req[4:].split(b"\0", 1)[0].decode()
        asked.append([command, name])
        if command == 2:
            break
        if command == 0:
            found = files.find(name)
            current = found.data if found else b""
            link.announce(len(current))
        else:
            link.write(current or b"")
    link.close()
    disk = _wait_on_port(port, lambda d: d.idProduct in (0x0001, 0x0104), 10)
    node = _wait_for_disk(port, 10)
    with open(node, "rb") as f:
        head = f.read(read_bytes)
    return {"status": status, "asked": asked, "final": f"{disk.idVendor:04x}:{disk.idProduct:04x}",
            "disk": node, "sha256": hashlib.sha256(head).hexdigest()}


def _wait_for_disk(port: str, timeout: float) -> str:
    """The disk shows up after its USB device, as the kernel's SCSI scan does."""
    import pyudev

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in pyudev.Context().list_devices(subsystem="block", DEVTYPE="disk"):
            parent = d.find_parent("usb", "usb_device")
            if parent is not None and parent.sys_name == port and d.device_node:
                return str(d.device_node)
        time.sleep(0.01)
    raise SystemExit(f"no disk under {port} within {timeout} s")


def _host_main(argv: list[str]) -> None:
    if argv[0] == "list":
        print(json.dumps({port: [_describe(d) for d in _on_port(port)] for port in argv[1:]}))
    else:
        print(json.dumps(_boot(argv[1], Path(argv[2]), argv[3], int(argv[4]))))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _host_main(sys.argv[1:])
    sys.exit(0)


# --- the tests ----------------------------------------------------------------------------------------

import os  # noqa: E402

import pytest  # noqa: E402

from hil.models import MODELS  # noqa: E402
from hil.virtual.journal import Journal  # noqa: E402
from hil.virtual.timing import DeviceClock  # noqa: E402
from hil.virtual.usb.payloads import make_payload  # noqa: E402
from hil.virtual.usb.side import VirtualUsb  # noqa: E402
from hil.virtual.usb.switches import default_switches  # noqa: E402

if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("needs umockdev: run pytest under umockdev-wrapper", allow_module_level=True)

from hil.virtual.usb.umockdev_bus import UsbBus  # noqa: E402

SPEEDUP = 100.0


@pytest.fixture(scope="module")
def bus() -> UsbBus:
    return UsbBus.get()


@pytest.fixture
def emmc(tmp_path: Path) -> Path:
    """A 64 MiB eMMC stand-in whose first MiB is recognisable."""
    path = tmp_path / "emmc.img"
    with open(path, "wb") as f:
        f.write(os.urandom(MIB))
        f.truncate(64 * MIB)
    return path


@pytest.fixture
def sides():
    made: list[VirtualUsb] = []
    yield made
    for side in made:
        side.power_off()


def _side(bus: UsbBus, sides: list[VirtualUsb], name: str, port: str, emmc: Path,
          journal: Journal) -> VirtualUsb:
    model = MODELS[name]
    side = VirtualUsb(model, bus.port(port), str(emmc), emmc.stat().st_size, default_switches(model),
                      DeviceClock(SPEEDUP), journal)
    sides.append(side)
    return side


def _host(bus: UsbBus, *args: str, timeout: float = 30) -> Any:
    done = subprocess.run([sys.executable, __file__, *args], env=bus.child_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_rom_appears_only_on_power_on_with_usb_boot(bus, sides, emmc):
    journal = Journal()
    side = _side(bus, sides, "cm4", "5-1.1", emmc, journal)
    side.power_on(usb_boot=False)
    time.sleep(5 * 0.3 / SPEEDUP)
    assert _host(bus, "list", "5-1.1") == {"5-1.1": []}
    side.power_off()
    side.power_on(usb_boot=True)
    _wait(lambda: side.state == "rom")
    assert [d["id"] for d in _host(bus, "list", "5-1.1")["5-1.1"]] == ["0a5c:2711"]
    side.power_off()
    assert _host(bus, "list", "5-1.1") == {"5-1.1": []}


def test_rom_identity_per_model(bus, sides, emmc):
    ports = {"cm1": "5-2.1", "cm3": "5-2.2", "cm4": "5-2.3", "cm5": "5-2.4"}
    for name, port in ports.items():
        _side(bus, sides, name, port, emmc, Journal()).power_on(usb_boot=True)
    _wait(lambda: all(side.state == "rom" for side in sides))
    seen = {port: devices[0] for port, devices in _host(bus, "list", *ports.values()).items()}
    assert {name: seen[port]["id"] for name, port in ports.items()} == \
        {"cm1": "0a5c:2763", "cm3": "0a5c:2764", "cm4": "0a5c:2711", "cm5": "0a5c:2712"}
    assert [seen[p]["iserial"] for p in ports.values()] == [0, 0, 3, 3]
    assert seen["5-2.3"]["serial"] == sides[2].serial and seen["5-2.1"]["serial"] is None
    assert seen["5-2.1"]["speed"] == 2 and seen["5-2.3"]["speed"] == 3  # libusb: 2 full, 3 high
    assert all(d["interfaces"] == 1 for d in seen.values())  # the kernel caches the 32-byte form
    quirk, plain = [[55, 2], [32, 1]], [[32, 1], [32, 1]]  # (wTotalLength, bNumInterfaces) of two reads
    assert [seen[p]["config_reads"] for p in ports.values()] == [plain, quirk, quirk, plain]


@pytest.mark.parametrize("name, kind, last_file, final", [
    ("cm1", "msd", "start.elf", "0a5c:0001"), ("cm4", "mass-storage-gadget64", "boot.img", "0a5c:0104")])
def test_usb_boot_ends_as_disk_with_emmc_bytes(bus, sides, emmc, tmp_path, name, kind, last_file, final):
    journal = Journal()
    port = {"cm1": "5-3.1", "cm4": "5-3.2"}[name]
    payload = make_payload(tmp_path, kind, (name,), boot_img_size=4 * MIB)
    side = _side(bus, sides, name, port, emmc, journal)
    side.power_on(usb_boot=True)
    result = _host(bus, "boot", port, str(payload), name, str(MIB))
    assert result["status"] == 0 and result["final"] == final
    assert result["sha256"] == hashlib.sha256(emmc.read_bytes()[:MIB]).hexdigest()
    assert result["asked"][-1][0] == 2 and [1, last_file] in result["asked"] and side.state == "mass-storage"
    assert journal.stages() == ["rom", "rom-status", "second-stage", "done", "mass-storage", "final"]
    side.power_off()
    assert _host(bus, "list", port) == {port: []}
