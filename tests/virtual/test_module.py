"""The virtual module seen from outside, as the framework sees hardware: relays are gpiozero output
devices, the console is a serial port read with pyserial, and the eMMC is a file an image is written to."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial
from gpiozero import OutputDevice

from hil.image import fat, mbr
from hil.image.build import ImageSpec, build_image
from hil.rig import Rig, load_rig
from hil.virtual.console import VirtualConsole
from hil.virtual.emmc import VirtualEmmc
from hil.virtual.journal import Journal
from hil.virtual.module import State, VirtualModule
from hil.virtual.relays import mock_factory
from hil.virtual.timing import DeviceClock

REPO = Path(__file__).resolve().parents[2]
MiB = 1024**2
TIMEOUT = 10.0  # host seconds; boots at speed-up 50 take well under one


class FakeUsbSide:
    """Records what the module tells its USB side."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def power_on(self, usb_boot: bool) -> None:
        self.calls.append(f"on usb_boot={usb_boot}")

    def power_off(self) -> None:
        self.calls.append("off")


class Bench:
    """A virtual module on its carrier: relays, console and eMMC, driven only from outside."""

    def __init__(self, rig: Rig, tmp: Path):
        self.rig = rig
        self.tmp = tmp
        self.journal = Journal()
        clock = DeviceClock(rig.virtual.speedup if rig.virtual else 1.0)
        assert rig.virtual is not None
        self.emmc = VirtualEmmc(tmp / "emmc.img", rig.emmc_size, rig.virtual.emmc, self.journal).open()
        self.console = VirtualConsole.for_rig(rig, clock, self.journal).open()
        self.module = VirtualModule(rig, self.emmc, self.console, clock, self.journal)
        self.usb = FakeUsbSide()
        self.module.usb = self.usb
        factory = mock_factory()
        self.module.connect_relays(factory)
        r = rig.relays
        assert r.power and r.nrpi_boot
        self.power = OutputDevice(r.power.gpio, active_high=r.power.active_high, initial_value=False,
                                  pin_factory=factory)
        self.nrpi_boot = OutputDevice(r.nrpi_boot.gpio, active_high=r.nrpi_boot.active_high,
                                      initial_value=False, pin_factory=factory)
        self.devices = [self.power, self.nrpi_boot]
        if r.eeprom_nwp:
            self.nwp = OutputDevice(r.eeprom_nwp.gpio, active_high=r.eeprom_nwp.active_high,
                                    initial_value=False, pin_factory=factory)
            self.devices.append(self.nwp)
        self.port = serial.Serial(rig.console.device, rig.console.baud, timeout=0.05)

    def flash(self, spec: ImageSpec, change: Callable[[Path], None] | None = None) -> str:
        """Build an image and write it over the start of the eMMC, as a flash would; its build id."""
        spec = dataclasses.replace(spec, model=self.rig.model.name, size=64 * MiB, boot_size=36 * MiB)
        built = build_image(self.tmp / "image.img", spec)
        if change:
            change(built.path)
        with open(built.path, "rb") as src, open(self.emmc.image_path, "r+b") as dst:
            while chunk := src.read(4 * MiB):
                dst.write(chunk)
        built.path.unlink()
        return built.build_id

    def read_until(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """Console text up to and including a match of ``pattern``; fails with what came instead."""
        got = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got += self.port.read(max(1, self.port.in_waiting)).decode("utf-8", "replace")
            if re.search(pattern, got, re.M):
                return got
        raise AssertionError(f"no {pattern!r} on the console within {timeout} s; got:\n{got[-3000:]}")

    def quiet_for(self, seconds: float) -> bytes:
        """Whatever arrives within ``seconds``."""
        got = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            got += self.port.read(4096)
        return got

    def run(self, command: str) -> str:
        """Type a command at the shell; its output (the echo and the next prompt stripped)."""
        self.port.write(command.encode() + b"\r")
        text = self.read_until(r"^root@[\w-]+:~# \Z").replace("\r", "")
        return re.sub(r"root@[\w-]+:~# \Z", "", text.split("\n", 1)[1])

    def login(self) -> None:
        """At the login prompt: log in as root."""
        self.port.write(b"root\r")
        self.read_until(r"^root@[\w-]+:~# \Z")
        assert self.module.wait_state(State.LOGGED_IN, TIMEOUT)

    def close(self) -> None:
        self.port.close()
        for device in self.devices:
            device.close()
        self.module.close()
        self.console.close()
        self.emmc.close()


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Bench]]:
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    made: list[Bench] = []

    def make(model: str = "cm4", speedup: float = 50.0) -> Bench:
        rig = load_rig(REPO / "rigs" / f"virtual-{model}.toml")
        assert rig.virtual is not None
        virtual = dataclasses.replace(rig.virtual, speedup=speedup, state_dir=tmp_path / "state",
                                      emmc=dataclasses.replace(rig.virtual.emmc, loop_device=False))
        # configured with BOOT_UART=1 (the factory config has 0), so the bootloader's own behaviour shows
        customise = dataclasses.replace(rig.customise, bootloader_uart=rig.model.has_eeprom)
        made.append(Bench(dataclasses.replace(rig, virtual=virtual, customise=customise), tmp_path))
        return made[-1]

    yield make
    for b in made:
        b.close()


def stuck(b: Bench) -> str:
    """Wait until the boot goes no further; the journal's reason."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        events = [e for e in b.journal.events("stage") if e.what == "stuck"]
        if events:
            return str(events[-1].details["why"])
        time.sleep(0.01)
    raise AssertionError(f"the module did not stop booting: {b.journal.stages()}")


def test_cm4_boots_its_image_and_logs_in(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    build_id = b.flash(ImageSpec(hostname="node7", cmdline=("hil.marker=42",)))
    b.power.on()
    text = b.read_until(r"node7 login: \Z")
    assert text.index("RPi: BOOTLOADER release") < text.index("Booting Linux on physical CPU")
    assert "Read start4.elf" in text and "Machine model: Raspberry Pi Compute Module 4" in text
    cmdline = re.search(r"Kernel command line: (.*)\r\n", text)
    assert cmdline and "console=ttyS0,115200" in cmdline.group(1) and "hil.marker=42" in cmdline.group(1)
    assert "\r\nRaspberry Pi OS (hil test image" in text and "node7 ttyS0" in text
    assert b.module.wait_state(State.RUNNING, TIMEOUT)
    b.login()
    assert b.run("cat /etc/build-id") == f"{build_id}\n"
    assert b.run("cat /etc/nothing; echo $?") == "cat: /etc/nothing: No such file or directory\n1\n"
    assert b.run("false && echo no || echo yes") == "yes\n"
    assert b.run("frobnicate") == "-bash: frobnicate: command not found\n"
    assert b.run("echo $?") == "127\n"
    assert b.run("hostname") == "node7\n"
    assert b.run("uname -a").startswith("Linux node7 6.") and b.run("uname -m") == "aarch64\n"
    b.port.write(b"cat /proc/device-tree/model\r")
    assert "Raspberry Pi Compute Module 4 Rev 1.0\0root@node7:~# " in b.read_until(r"~# \Z")
    b.port.write(b"exit\r")
    b.read_until(r"logout\r\n\r\nRaspberry Pi OS[^\n]*\r\n\r\nnode7 login: \Z")
    assert b.module.wait_state(State.RUNNING, TIMEOUT)


@pytest.mark.parametrize("model", ["cm1", "cm3", "cm5"])
def test_other_models_boot_to_login(bench: Callable[..., Bench], model: str) -> None:
    b = bench(model)
    b.flash(ImageSpec())
    b.power.on()
    text = b.read_until(r"raspberrypi login: \Z")
    assert ("RPi: BOOTLOADER release" in text) == (model == "cm5")  # the GPU firmware of a CM1/3 is silent
    assert re.search(r"Machine model: Raspberry Pi Compute Module", text)
    assert b.usb.calls == ["on usb_boot=False"]


def test_no_kernel_output_without_enable_uart(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.flash(ImageSpec(uart=False))
    b.power.on()
    assert "serial console" in stuck(b)
    text = b.quiet_for(0.1).decode()
    assert "Starting start4.elf" in text and "Booting Linux" not in text and "login:" not in text


def test_kernel_console_follows_cmdline_and_config(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.flash(ImageSpec(cmdline=("quiet",)))
    b.power.on()
    text = b.read_until(r"login: \Z")
    assert "Starting start4.elf" in text and "Booting Linux" not in text  # quiet: no kernel messages
    b.power.off()
    assert b.module.wait_state(State.OFF, TIMEOUT)
    b.flash(ImageSpec(cmdline=("console=serial0,9600",)))  # the last console= sets the rate
    b.quiet_for(0.05)
    b.power.on()
    text = b.read_until(r"Starting start4.elf.*\n")
    garbage = b.quiet_for(0.4)
    assert garbage and b"Linux" not in garbage and all(byte >= 0x80 for byte in garbage.replace(b"\r", b""))


def test_boot_mode_is_sampled_only_at_power_on(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.flash(ImageSpec())
    b.nrpi_boot.on()
    b.power.on()
    assert b.module.wait_state(State.USB_BOOT, TIMEOUT)
    assert b.usb.calls == ["on usb_boot=True"]
    b.nrpi_boot.off()  # released while powered: the ROM already chose USB
    assert b.quiet_for(0.3) == b""
    assert b.module.state == State.USB_BOOT and b.usb.calls == ["on usb_boot=True"]
    b.power.off()
    assert b.module.wait_state(State.OFF, TIMEOUT)
    assert b.usb.calls[-1] == "off"
    b.power.on()  # nRPI_BOOT released now: the next power-on boots the eMMC
    b.read_until("BOOTLOADER release")
    assert b.module.wait_state(State.RUNNING, TIMEOUT)
    b.nrpi_boot.on()
    assert b.module.state == State.RUNNING
    assert b.usb.calls[-1] == "on usb_boot=False"


def test_power_cut_drops_console_and_shell(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.flash(ImageSpec())
    b.power.on()
    b.read_until(r"login: \Z")
    b.login()
    b.power.off()
    assert b.module.wait_state(State.OFF, TIMEOUT)
    b.port.write(b"echo still here\r")
    assert b.quiet_for(0.2) == b""
    assert b.usb.calls == ["on usb_boot=False", "off"]
    b.power.on()
    b.read_until(r"login: \Z")  # a fresh boot: the login is gone
    assert b.module.wait_state(State.RUNNING, TIMEOUT) and b.module.state != State.LOGGED_IN


def test_power_cut_stops_output_mid_boot(bench: Callable[..., Bench]) -> None:
    b = bench("cm4", speedup=2.0)  # slow enough to cut the bootloader off in its first lines
    b.flash(ImageSpec())
    b.power.on()
    b.read_until("BOOTMODE")
    b.power.off()
    assert b.module.wait_state(State.OFF, TIMEOUT)
    b.quiet_for(0.05)  # what was already on the wire
    assert b.quiet_for(0.5) == b""


def test_short_power_glitch_does_not_reset(bench: Callable[..., Bench]) -> None:
    b = bench("cm4", speedup=5.0)  # discharge time 0.5 s / 5: the glitch below is far shorter
    b.power.on()  # blank eMMC: the bootloader loops for ever
    b.read_until("Boot mode: SD")
    b.power.off()
    b.power.on()
    b.read_until("Boot mode: USB-MSD")
    assert [e.what for e in b.journal.events("power")] == ["on", "glitch ignored"]
    b.power.off()
    assert b.module.wait_state(State.OFF, TIMEOUT)


def test_blank_emmc_cm4_bootloader_retries_for_ever(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.power.on()
    text = b.read_until(r"(?s)Boot mode: RESTART.*Boot mode: SD \(01\).*Boot mode: RESTART")
    first = text.index("Boot mode: SD (01) order f2564")
    assert text.index("Boot mode: USB-MSD (04)", first) < text.index("Boot mode: NETWORK (02)", first)
    assert "Starting start4.elf" not in text
    assert b.module.state == State.EMMC_BOOT


def test_cm4_without_start4_elf_retries(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")

    def remove_firmware(image: Path) -> None:
        with open(image, "r+b") as f:  # overwrite the FAT boot sector: no boot filesystem any more
            f.seek(4 * MiB)
            f.write(bytes(512))

    b.flash(ImageSpec(), remove_firmware)
    b.power.on()
    text = b.read_until(r"(?s)Filesystem not found.*Boot mode: RESTART.*Filesystem not found")
    assert "Booting Linux" not in text


def test_blank_emmc_cm3_is_silent_and_waits_on_usb(bench: Callable[..., Bench]) -> None:
    b = bench("cm3")
    b.power.on()
    assert b.module.wait_state(State.USB_BOOT, TIMEOUT)
    assert b.quiet_for(0.3) == b""
    assert b.usb.calls == ["on usb_boot=False", "off", "on usb_boot=True"]


def test_bad_root_waits_then_panics(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.flash(ImageSpec(cmdline=("root=/dev/mmcblk0p5", "rootwait=2")))
    b.power.on()
    text = b.read_until(r"end Kernel panic.*\n")
    assert "Waiting for root device /dev/mmcblk0p5..." in text
    assert 'VFS: Cannot open root device "/dev/mmcblk0p5" or unknown-block(0,0): error -6' in text
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)" in text
    assert stuck(b) == "kernel panic" and "login:" not in b.quiet_for(0.2).decode()


def test_bad_kernel_header_hangs_after_the_firmware(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")

    def break_kernel(image: Path) -> None:
        fat.write_file(image, mbr.read_layout(image).partition(1), "kernel8.img", bytes(4096))

    b.flash(ImageSpec(), break_kernel)
    b.power.on()
    assert "kernel8.img" in stuck(b)
    text = b.quiet_for(0.1).decode()
    assert text.rstrip().endswith("Starting start4.elf @ 0xfec00200 partition 0")


def test_reboot_boots_again_and_poweroff_halts(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.flash(ImageSpec())
    b.power.on()
    b.read_until(r"login: \Z")
    b.login()
    b.port.write(b"reboot\r")
    text = b.read_until(r"login: \Z")
    assert text.index("reboot: Restarting system") < text.index("RPi: BOOTLOADER release")
    b.login()
    b.port.write(b"poweroff\r")
    b.read_until(r"reboot: Power down\r\n")
    assert b.module.wait_state(State.HALTED, TIMEOUT)
    b.port.write(b"root\r")
    assert b.quiet_for(0.2) == b""
    assert b.usb.calls[-1] == "off"


def test_login_needs_the_image_to_allow_it(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    b.flash(ImageSpec())
    b.power.on()
    b.read_until(r"login: \Z")
    b.port.write(b"pi\r")
    b.read_until(r"Password: \Z")
    b.port.write(b"secret\r")
    text = b.read_until(r"login: \Z")
    assert "secret" not in text and "Login incorrect" in text
    assert b.module.state == State.RUNNING


def test_eeprom_write_protect_level_is_kept(bench: Callable[..., Bench]) -> None:
    b = bench("cm4")
    assert not b.module.eeprom_write_protected
    b.nwp.on()
    assert b.module.eeprom_write_protected
    b.nwp.close()  # a released GPIO lets the relay drop
    assert not b.module.eeprom_write_protected
