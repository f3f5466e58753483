"""The kernel USB transport: the virtual modules behind Linux's own USB stack (dummy_hcd, raw_gadget, configfs
mass storage, usbfs, usb-storage, udev, usbmon) in a QEMU guest. Each guest costs 10-15 s of one core to boot, so
the four models share one guest run of the plugin's flash suite."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil.hostenv import outside_umockdev
from tests.hilrun import hil
from tests.rigfiles import virtual_rig_toml

MODELS = ("cm1", "cm3", "cm4", "cm5")
ROOT = Path(__file__).resolve().parents[2]
TRACE = re.compile(r"usbmon trace \((\d+) lines\) (\S+), kernel log (\S+)")
pytestmark = pytest.mark.timeout(900)


def kernel_rig(tmp: Path, model: str, bus: int, *, transport: str = "kernel") -> Path:
    """A rig on root port ``bus``-1 (dummy_hcd has no hubs), with GPIOs of its own."""
    path = tmp / f"{transport}-{model}.toml"
    path.write_text(virtual_rig_toml(f"{transport}-{model}", model, f"{bus}-1", emmc="256MiB",
                                     state_dir=tmp / "state" / model, power_gpio=10 + 3 * bus,
                                     boot_gpio=11 + 3 * bus, nwp_gpio=12 + 3 * bus,
                                     extra={"virtual": {"transport": transport}}))
    return path


def guest_files(stderr: str) -> tuple[Path, Path]:
    """The usbmon trace and kernel log the guest run names on stderr."""
    found = TRACE.search(stderr)
    assert found, stderr[-2000:]
    assert int(found[1]) > 0
    return Path(found[2]), Path(found[3])


def test_plugin_flashes_every_model_through_the_kernels_usb_stack(tmp_path: Path) -> None:
    rigs = [kernel_rig(tmp_path, model, bus) for bus, model in enumerate(MODELS, start=1)]
    junit, results = tmp_path / "junit.xml", tmp_path / "allure"
    argv = [sys.executable, "-m", "pytest", "suites/test_flash_and_boot.py", "-k", "written or partitions",
            "--image-size", "96MiB", f"--junitxml={junit}", f"--alluredir={results}", "-p", "no:cacheprovider",
            *(f"--rig={rig}" for rig in rigs)]
    run = subprocess.run(argv, cwd=ROOT, env=outside_umockdev(), capture_output=True, text=True, timeout=840,
                         check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    cases = ET.parse(junit).getroot().iter("testcase")
    passed = [c.get("name", "") for c in cases if not list(c)]
    for model in MODELS:  # two tests per rig, each parametrised by the rig's name
        assert sum(f"kernel-{model}" in name for name in passed) == 2, passed

    usbmon, dmesg = guest_files(run.stderr)
    kernel_log = dmesg.read_text()
    # The disks are the guest kernel's own: usb-storage on every bus, and an sd disk for each (one after another).
    for bus in range(1, len(MODELS) + 1):
        assert re.search(rf"usb-storage {bus}-1:1\.0: USB Mass Storage device detected", kernel_log), kernel_log
    assert len(re.findall(r"\[sd[a-z]\] Attached SCSI removable disk", kernel_log)) >= len(MODELS)
    # The BCM2835 ROM (cm1, bus 1) enumerates at full speed, as usbboot #69 shows; the later ROMs at high speed.
    assert re.search(r"usb 1-1: new full-speed USB device number \d+ using dummy_hcd", kernel_log)
    assert re.search(r"usb 3-1: new high-speed USB device number \d+ using dummy_hcd", kernel_log)
    # usbmon saw the boot protocol: the vendor announce (0x40) and bulk OUT data on each bus.
    trace = usbmon.read_text()
    for bus in range(1, len(MODELS) + 1):
        assert re.search(rf" S Co:{bus}:\d+:0 s 40 00 ", trace), f"no announce on bus {bus}"
        assert re.search(rf" C Bo:{bus}:\d+:\d+ 0 \d+ ", trace), f"no bulk OUT on bus {bus}"
    # ... and each flash test's report carries the usbmon text of its own bus.
    attached = [p.read_text(errors="replace") for p in results.glob("*-attachment.txt")]
    for bus in range(1, len(MODELS) + 1):
        assert any(re.search(rf" S Co:{bus}:\d+:0 s 40 00 ", text) for text in attached), f"bus {bus}"


def test_lsusb_reads_the_same_rom_on_both_transports(tmp_path: Path) -> None:
    """Descriptors byte for byte, through usbfs on both; what differs is documented in docs/fidelity.md."""
    kernel = hil("virtual", "run", "--rig", str(kernel_rig(tmp_path, "cm4", 1)), "--", "sh", "-c",
                 "lsusb -v -d 0a5c:; udevadm info -q property -p /sys/bus/usb/devices/1-1", timeout=300)
    fake = hil("virtual", "run", "--rig", str(kernel_rig(tmp_path, "cm4", 2, transport="umockdev")), "--", "sh",
               "-c", "lsusb -v -d 0a5c:; udevadm info -q property -p /sys/bus/usb/devices/2-1", timeout=120)
    assert kernel.returncode == 0, kernel.stderr[-3000:]
    assert fake.returncode == 0, fake.stderr[-3000:]

    def descriptors(text: str) -> list[str]:
        lines = text[text.index("Device Descriptor:"):].splitlines()
        return lines[:next(i for i, line in enumerate(lines) if line.startswith("Device Status:"))]

    assert descriptors(kernel.stdout) == descriptors(fake.stdout)
    assert "iSerial                 3 " in kernel.stdout  # the index that tells a host the ROM from a second stage
    # dummy_hcd answers GET_STATUS itself (bus powered); the umockdev transport asks the model (self powered).
    assert "Device Status:     0x0000" in kernel.stdout and "Device Status:     0x0001" in fake.stdout

    def udev(text: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z_]+=", line))

    properties, faked = udev(kernel.stdout), udev(fake.stdout)
    assert (properties["ID_VENDOR_ID"], properties["ID_MODEL_ID"], properties["DRIVER"]) == ("0a5c", "2711", "usb")
    # udev's usb_id properties agree; the kernel side adds what udev's rules and hwdb add (not modelled)
    only_udevd = {"TAGS", "CURRENT_TAGS", "ID_FOR_SEAT", "USEC_INITIALIZED", "ID_VENDOR_FROM_DATABASE"}
    assert set(properties) - only_udevd == set(faked)
    per_host = {"ID_PATH", "ID_PATH_TAG"}  # pci-...-usb-0:1 on umockdev, platform-dummy_hcd.0-usb-0:1 here
    assert {k: v for k, v in properties.items() if k.startswith("ID_") and k in faked and k not in per_host} == \
        {k: v for k, v in faked.items() if k.startswith("ID_") and k not in per_host}
    usbmon, _ = guest_files(kernel.stderr)
    assert re.search(r" S Ci:1:\d+:0 s 80 06 0100 0000 0012 18 <", usbmon.read_text())  # GET_DESCRIPTOR(device)


def test_bad_input_is_refused_before_the_guest_boots(tmp_path: Path) -> None:
    """Exit 2 at once, not after a guest's start-up: a missing image, a hub port."""
    missing = hil("flash", str(tmp_path / "missing.img"), "--rig", str(kernel_rig(tmp_path, "cm4", 1)), timeout=60)
    assert missing.returncode == 2 and "cannot be read" in missing.stderr, missing.stderr
    assert "guest" not in missing.stderr
    run = hil("virtual", "run", "--transport", "kernel", "--rig", str(ROOT / "rigs" / "virtual-cm4.toml"), "--",
              "true", timeout=60)
    assert run.returncode == 2, run.stderr
    assert "behind a hub" in run.stderr and "starting the kernel-transport guest" not in run.stderr
    rig = tmp_path / "hub.toml"
    rig.write_text(virtual_rig_toml("hub", "cm4", "1-1.4", extra={"virtual": {"transport": "kernel"}}))
    check = hil("rig", "check", str(rig), timeout=60)
    assert check.returncode == 2 and "usb.port" in check.stderr, check.stderr
    rig.write_text(virtual_rig_toml("profiled", "cm4", "1-1", extra={"virtual": {"transport": "kernel", "usb": {
        "controllers": {"1-1": "ehci-hypothesis-maxpacket"}}}}))
    check = hil("rig", "check", str(rig), timeout=60)
    assert check.returncode == 2 and "virtual.usb.controllers" in check.stderr, check.stderr


def test_an_unanswered_announce_times_out_and_the_retry_is_answered(tmp_path: Path) -> None:
    """rom_failed_exchanges on the kernel transport: the host's first announce ends by its timeout (-ENOENT in
    usbmon) and its retry is answered, as on the umockdev transport and on the hosts of usbboot #87; raw_gadget
    would stall the retry if the device did not learn from usbmon that the host gave up."""
    rig = kernel_rig(tmp_path, "cm4", 1)
    rig.write_text(rig.read_text() + "\n[virtual.usb]\nrom_failed_exchanges = 1\n")
    image = tmp_path / "cm4.img"
    assert hil("image", "build", str(image), "--model", "cm4", "--size", "96MiB", timeout=120).returncode == 0
    run = hil("flash", str(image), "--rig", str(rig), "--dry-run", timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    usbmon, _ = guest_files(run.stderr)
    # each boot-message announce (vendor OUT, 24 bytes) and how it ended, in order
    ends = re.findall(r" S Co:1:\d+:0 s 40 00 0018 0000 0000 0\n[^\n]* C Co:1:\d+:0 (-?\d+) 0\n", usbmon.read_text())
    assert ends[:2] == ["-2", "0"], ends  # the host's timeout, then an answered retry
