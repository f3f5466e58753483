"""What the virtual module prints when it boots from its eMMC, worked out from what is on the eMMC.

The boot chain is followed as the real one runs, reading the eMMC's native image at power-on: the
EEPROM bootloader of a CM4/CM5 (which reports on the UART) or the silent ROM and GPU firmware of a
CM1/CM3, the boot partition's config.txt and cmdline.txt, the firmware, kernel and device tree files,
then the kernel, which resolves ``root=`` against the partition table and mounts the ext4 root, and
userspace up to the getty. Each step that finds something wrong fails the way the hardware does:
the bootloader's endless retry loop, silence, a hang, a wait for the root device or a kernel panic.
As on hardware, a ``root=`` that names no partition makes a kernel with plain ``rootwait`` wait for
ever; ``rootwait=N`` gives up after N seconds and panics, as does a kernel without ``rootwait``.

:func:`boot` yields what appears on the UART, each piece after a delay in hardware seconds; its return
value says how the boot ended.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import HilError
from hil.image import ext4, fat
from hil.image.bootfs import ARM64_MAGIC, FDT_MAGIC, ZIMAGE_MAGIC, boot_files
from hil.image.mbr import DiskLayout, Partition, partuuid, read_layout
from hil.models import ModuleModel
from hil.virtual.eeprom import Bootloader

BOOTLOADER_BAUD = 115200  # the EEPROM bootloader's BOOT_UART rate
FAT_TYPES = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E})
MMC_MAJOR = 179


@dataclass(frozen=True)
class Emit:
    delay: float  # hardware seconds after the previous output
    text: str
    baud: int | None = BOOTLOADER_BAUD  # the rate it is sent at; None: no UART involved (echo)


@dataclass(frozen=True)
class UsbFallback:
    """The ROM found nothing to boot on the eMMC and waits as a USB device (CM1, CM3, CM4S)."""


@dataclass(frozen=True)
class Reboot:
    """The kernel gave up and restarts the SoC (``panic=N``)."""


@dataclass(frozen=True)
class System:
    """A kernel that reached userspace: what its shell and getty know."""

    image: Path
    root: Partition
    hostname: str
    tty: str
    baud: int  # the serial console's rate, from console=
    release: str  # uname -r
    version: str  # uname -v
    machine: str  # uname -m
    issue: str  # /etc/issue, escapes expanded
    show_status: bool  # systemd's status lines reach the UART (it is /dev/console, not quiet)
    proc: dict[str, bytes] = field(default_factory=dict)  # files that exist only at run time

    def read(self, path: str) -> bytes | None:
        """A file of the running system, read from the eMMC now (the root filesystem or /proc)."""
        if path in self.proc:
            return self.proc[path]
        return ext4.read_file(self.image, self.root, path)


@dataclass(frozen=True)
class Stuck:
    """The boot goes no further; the UART stays silent from here on. ``why`` is for the journal."""

    why: str


Outcome = System | UsbFallback | Reboot | Stuck


class _NothingToBoot:
    """A boot mode found nothing: the bootloader moves on to its next mode."""

BootLog = Generator[Emit, None, Outcome]


@dataclass(frozen=True)
class Chip:
    """Per-model facts the boot log shows: all invented but plausible, and stable per model."""

    boardrev: str
    cpu: str  # MIDR, printed by arm64 kernels
    serial0: str  # the tty behind serial0 (the UART on GPIO14/15)
    uart_line: str
    mmc_line: str
    flavour: str  # kernel flavour: 64-bit and (if any) 32-bit
    flavour32: str = ""
    kernel32: str = ""  # kernel name with arm_64bit=0


CHIPS: dict[str, Chip] = {
    "cm1": Chip("900061", "", "ttyAMA0",
                 "20201000.serial: ttyAMA0 at MMIO 0x20201000 (irq = 81, base_baud = 0) is a PL011 rev2",
                 "mmc0: sdhost-bcm2835 loaded - DMA enabled (>1)", "", "v6", kernel32="kernel.img"),
    "cm3": Chip("a020a0", "0x410fd034", "ttyAMA0",
                 "3f201000.serial: ttyAMA0 at MMIO 0x3f201000 (irq = 99, base_baud = 0) is a PL011 rev2",
                 "mmc0: sdhost-bcm2835 loaded - DMA enabled (>1)", "v8", "v7", kernel32="kernel7.img"),
    "cm4": Chip("c03141", "0x410fd083", "ttyS0",
                 "fe215040.serial: ttyS0 at MMIO 0xfe215040 (irq = 34, base_baud = 62500000) is a 16550",
                 "mmc0: SDHCI controller on fe340000.mmc [fe340000.mmc] using ADMA", "v8", "v7l",
                 kernel32="kernel7l.img"),
    "cm5": Chip("c04180", "0x414fd0b1", "ttyAMA10",
                 "107d001000.serial: ttyAMA10 at MMIO 0x107d001000 (irq = 16, base_baud = 0) is a PL011 AXI",
                 "mmc0: SDHCI controller on 1000fff000.mmc [1000fff000.mmc] using ADMA 64-bit", "2712"),
}
CHIPS["cm3+"] = CHIPS["cm3"]
CHIPS["cm4s"] = Chip("a03150", "0x410fd083", "ttyAMA0",
                       "fe201000.serial: ttyAMA0 at MMIO 0xfe201000 (irq = 36, base_baud = 0) is a PL011 "
                       "rev2",
                       CHIPS["cm4"].mmc_line, "v8", "v7l", kernel32="kernel7l.img")

#: config.txt section filters each model obeys (besides [all]).
_FILTERS = {"cm1": {"pi1", "cm1"}, "cm3": {"pi3", "cm3"}, "cm3+": {"pi3", "cm3+"}, "cm4": {"pi4", "cm4"},
            "cm4s": {"pi4", "cm4s"}, "cm5": {"pi5", "cm5"}}

_BOOT_MODES = {0x0: "SD", 0x1: "SD", 0x2: "NETWORK", 0x3: "RPIBOOT", 0x4: "USB-MSD", 0x5: "BCM-USB-MSD", 0x6: "NVME",
               0x7: "HTTP", 0xE: "STOP", 0xF: "RESTART"}
# What each boot mode prints when it finds nothing, and how long it looks (hardware seconds).
_EMPTY_MODES: dict[int, tuple[float, tuple[str, ...]]] = {
    0x2: (4.0, ("GENET START: 64 16 32", "GENET: UMAC_START 0xdca632f0 0x52e30000",
                "NET_BOOT: dc:a6:32:f0:52:e3 wait for link TFTP: 0.0.0.0",
                "LINK STATUS: speed: 0 full duplex",
                "Link down: no cable, skipping network boot")),
    0x3: (0.5, ("RPIBOOT: no USB host connected",)),
    0x4: (1.6, ("PCI0 init", "PCI0 reset", "PCIe scan 00001106:00003483", "XHCI-STOP",
                "xHC0 ver: 256 HCS: 05000420 fc000031 00e70004 HCC: 002841eb", "USBSTS 11",
                "xHC0 ports 5 slots 32 intrs 4", "Reset USB port-power 1000 ms",
                "USB-MSD: no mass storage device found")),
    0x5: (0.8, ("DWC_OTG: host mode", "USB-MSD: no mass storage device found on the BCM USB port")),
    0x6: (0.4, ("PCI0 init", "PCI0 reset", "PCIe scan 00000000:00000000", "NVME: no controller found")),
    0x7: (0.5, ("HTTP: no network link",)),
}


def serial_number(rig_name: str) -> int:
    """A board serial number, the same for every run of a rig (OTP on a real module)."""
    return zlib.crc32(rig_name.encode()) | 0x10000000


def boot(model: ModuleModel, image: Path, serial: int, eeprom: Bootloader | None = None) -> BootLog:
    """The UART output of one boot from the eMMC image at ``image``; returns how the boot ends.

    ``eeprom`` is the bootloader a CM4/CM5's EEPROM holds (None: no valid one, e.g. after a torn update)."""
    chip = CHIPS[model.name]
    disk = BootDisk(image)
    if not model.has_eeprom and model.name != "cm5":
        return (yield from _gpu_boot(model, chip, disk))
    if eeprom is None:  # the ROM finds no bootloader in the SPI flash: silence, then it waits on USB
        yield Emit(0.3, "", None)
        return UsbFallback()
    return (yield from _bootloader(model, chip, disk, serial, eeprom))


class BootDisk:
    """The eMMC as the SoC reads it; an unreadable structure is simply absent, as to a boot ROM."""

    def __init__(self, image: Path):
        self.image = image
        self.size = image.stat().st_size if image.exists() else 0
        try:
            self.layout: DiskLayout | None = read_layout(image)
        except (HilError, OSError):
            self.layout = None
        self.boot: Partition | None = None
        if self.layout:
            for p in self.layout.partitions:
                if p.type_id in FAT_TYPES and fat.fat_type(image, p):
                    self.boot = p
                    break

    def boot_file(self, name: str) -> bytes | None:
        if self.boot is None:
            return None
        try:
            return fat.read_file(self.image, self.boot, name)
        except HilError:
            return None

    def boot_sector(self) -> bytes:
        assert self.boot is not None
        with open(self.image, "rb") as f:
            f.seek(self.boot.start)
            return f.read(512)


@dataclass(frozen=True)
class BootConfig:
    """config.txt as the firmware of one model reads it: later lines win, other models' sections skipped."""

    values: dict[str, str]

    @classmethod
    def parse(cls, text: str, model: str) -> BootConfig:
        values: dict[str, str] = {}
        active = True
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("[") and line.endswith("]"):
                name = line[1:-1].strip().lower()
                active = name == "all" or name in _FILTERS[model]
            elif active and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
        return cls(values)

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.values.get(key)
        return default if value is None else value.strip() not in ("0", "")


# -- the boot ROM, the EEPROM bootloader and the GPU firmware ---------------------------------------------


def _gpu_boot(model: ModuleModel, chip: Chip, disk: BootDisk) -> BootLog:
    """CM1/CM3 (and the EEPROM-less CM4S): the ROM loads bootcode.bin, the GPU firmware says nothing."""
    files = boot_files(model.name)
    if disk.boot_file(files.firmware[0]) is None:
        yield Emit(0.2, "", None)  # the ROM looks, finds no second stage on the eMMC
        return UsbFallback()
    if any(disk.boot_file(name) is None for name in files.firmware[1:]):
        return Stuck("bootcode.bin found no GPU firmware")  # the activity LED blinks, the UART is quiet
    return (yield from _kernel(model, chip, disk, started=3.2))


def _bootloader(model: ModuleModel, chip: Chip, disk: BootDisk, serial: int, eeprom: Bootloader) -> BootLog:
    """CM4/CM5: the EEPROM bootloader, which reports every step and walks its BOOT_ORDER (forever, with
    RESTART); a mode that finds nothing to boot hands over to the next."""
    yield Emit(0.35, f"RPi: BOOTLOADER release VERSION:{eeprom.version} DATE: {eeprom.date}\n")
    yield Emit(0.02, f"BOOTMODE: 0x06 partition 0 build-ts BUILD_TIMESTAMP={eeprom.timestamp} serial {serial:08x} "
                     f"boardrev {chip.boardrev} stc {400000 + serial % 90000}\n")
    yield Emit(0.05, "AON_RESET: 00000003 PM_RSTS: 00001000\n")
    settings = eeprom.config.settings
    yield Emit(0.01, f"POWER_OFF_ON_HALT: {settings.get('POWER_OFF_ON_HALT', '0')} WAIT_FOR_POWER_BUTTON: "
                     f"{settings.get('WAIT_FOR_POWER_BUTTON', '0')} power-on-reset: 1\n")
    order = list(eeprom.config.boot_order.modes)
    while True:
        for i, mode in enumerate(order):
            rest = "".join(f"{m:x}" for m in reversed(order[i + 1:])) or "0"
            yield Emit(0.05, f"Boot mode: {_BOOT_MODES.get(mode, 'UNKNOWN')} ({mode:02x}) order {rest}\n")
            if mode == 0xF:
                break  # RESTART: from the first mode again
            if mode == 0xE:
                return Stuck("BOOT_ORDER says STOP")
            if mode in (0x0, 0x1):  # SD CARD DETECT tries the card (the eMMC) just the same
                outcome = yield from _sd_mode(model, chip, disk)
                if not isinstance(outcome, _NothingToBoot):
                    return outcome
                continue
            seconds, lines = _EMPTY_MODES.get(mode, (0.2, ("Unknown boot mode",)))
            for n, line in enumerate(lines):
                yield Emit(seconds if n == len(lines) - 1 else 0.02, line + "\n")


def _sd_mode(model: ModuleModel, chip: Chip, disk: BootDisk) -> Generator[Emit, None, Outcome | _NothingToBoot]:
    """Boot mode SD (the eMMC on a CM); with nothing to boot on it, the bootloader tries its next mode."""
    yield Emit(0.02, "SD HOST: 200000000 CTL0: 0x00800000 BUS: 400000 Hz actual: 390625 HZ div: 512 (256) "
                     "status: 0x1fff0000 delay: 276\n")
    yield Emit(0.01, "SD HOST: 200000000 CTL0: 0x00800f00 BUS: 400000 Hz actual: 390625 HZ div: 512 (256) "
                     "status: 0x1fff0000 delay: 276\n")
    yield Emit(0.1, "EMMC\nSD retry 0 oc 0\nOCR c0ff8080 [0]\nCID: 00150100424a54443452030f9c4a247b\n")
    yield Emit(0.02, "SD HOST: 200000000 CTL0: 0x00800f04 BUS: 50000000 Hz actual: 50000000 HZ div: 4 (2) "
                     "status: 0x1fff0000 delay: 2\n")
    entries = {p.index: p for p in disk.layout.partitions} if disk.layout else {}
    for i in range(1, 5):
        p = entries.get(i)
        start, count, kind = (p.start // 512, p.size // 512, p.type_id) if p else (0, 0, 0)
        yield Emit(0.005, f"MBR: 0x{start:08x}, {count:7d} type: 0x{kind:02x}\n")
    yield Emit(0.01, "Trying partition: 0\n")
    if disk.boot is None:
        yield Emit(0.02, "Filesystem not found on partition 0\nFailed to open device: 'sdcard' "
                         "(cmd 371a0010 status 1fff0001)\n")
        return _NothingToBoot()
    sector = disk.boot_sector()
    bits = (fat.fat_type(disk.image, disk.boot) or "FAT32")[3:]
    label = sector[71:82] if bits == "32" else sector[43:54]
    yield Emit(0.02, f"type: {bits} lba: {disk.boot.start // 512} oem: '{_text(sector[3:11])}' "
                     f"volume: '{_text(label)}'\n")
    config_data = disk.boot_file("config.txt")
    if config_data is not None:
        yield Emit(0.03, f"Read config.txt bytes {len(config_data):8d} hnd 0x0\n")
    config = BootConfig.parse((config_data or b"").decode("utf-8", "replace"), model.name)
    files = boot_files(model.name)
    if model.name == "cm5":  # the CM5's firmware is in the EEPROM: it loads the kernel itself
        return (yield from _load_kernel_from_bootloader(model, chip, disk, config))
    for name in files.firmware:
        data = disk.boot_file(name)
        if data is None:
            yield Emit(0.02, f"Error -2 opening {name}\nFirmware not found\n")
            return _NothingToBoot()
        yield Emit(0.02 + len(data) / 25e6, f"Read {name} bytes {len(data):8d} hnd 0x0\n")
    yield Emit(0.02, f"0x00{chip.boardrev} 0x00000000 0x00000fff\nMEM GPU: 76 ARM: 948 TOTAL: 1024\n")
    yield Emit(0.01, "Firmware: 82f3750a65fadae9a38077e3c2e217ad158c8d54 Mar 17 2023 10:50:39\n")
    yield Emit(0.01, f"Starting {files.firmware[0]} @ 0xfec00200 partition 0\n")
    return (yield from _kernel(model, chip, disk, started=1.6, config=config))


def _load_kernel_from_bootloader(model: ModuleModel, chip: Chip, disk: BootDisk,
                                 config: BootConfig) -> Generator[Emit, None, Outcome | _NothingToBoot]:
    name = kernel_name(model, chip, config)
    data = disk.boot_file(name)
    if data is None:
        yield Emit(0.02, f"Error -2 loading '{name}'\nBoot failed: no kernel found on partition 0\n")
        return _NothingToBoot()
    yield Emit(0.02 + len(data) / 25e6,
               f"Loading '{name}' to 0x00000000 offset 0x200000 size 0x{len(data):x}\n")
    dtb = config.get("device_tree", boot_files(model.name).dtb)
    yield Emit(0.02, f"Loaded '{dtb}' to 0x2efec100 size 0x{len(disk.boot_file(dtb) or b''):x}\n")
    yield Emit(0.05, "Starting OS 1814 ms\n")
    return (yield from _kernel(model, chip, disk, started=0.3, config=config))


# -- the kernel ---------------------------------------------------------------------------------------------


@dataclass
class _KernelLog:
    """Kernel messages as the console shows them: timestamped, and only those under its loglevel."""

    loglevel: int
    baud: int | None  # None: no serial console, nothing of the kernel's reaches the UART
    now: float = 0.0  # kernel time, seconds since start

    def line(self, seconds: float, text: str, level: int = 6) -> Emit:
        """Advance kernel time by ``seconds`` and say ``text`` at ``level`` (6 info, 3 err, 0 emerg)."""
        self.now += seconds
        if self.baud is None or level >= self.loglevel:
            return Emit(seconds, "", None)
        return Emit(seconds, f"[{self.now:12.6f}] {text}\n", self.baud)

    def lines(self, seconds: float, texts: list[str], level: int = 6) -> list[Emit]:
        return [self.line(seconds if i == 0 else 0.0, t, level) for i, t in enumerate(texts)]


def _kernel(model: ModuleModel, chip: Chip, disk: BootDisk, *, started: float,
            config: BootConfig | None = None) -> BootLog:
    """From the firmware handing over (``started`` s after power-on) to the getty, or to where it stops."""
    if config is None:
        config = BootConfig.parse((disk.boot_file("config.txt") or b"").decode("utf-8", "replace"), model.name)
    kernel_file = kernel_name(model, chip, config)
    arm64 = config.flag("arm_64bit", model.name in ("cm4", "cm4s", "cm5")) or not chip.kernel32
    kernel = disk.boot_file(kernel_file)
    dtb = disk.boot_file(config.get("device_tree", boot_files(model.name).dtb))
    title = fdt_model(dtb) if dtb else None
    if kernel is None or title is None or not _runs(kernel, arm64):
        yield Emit(started, "", None)
        # no kernel, a kernel for the wrong mode or no device tree: the CPU runs into garbage
        bits = "64" if arm64 else "32"
        return Stuck(f"{kernel_file} missing or not a {bits}-bit kernel, or no device tree")
    cmdline_data = disk.boot_file(config.get("cmdline", "cmdline.txt")) or b""
    args = kernel_args(cmdline_data.decode("utf-8", "replace").split("\n", 1)[0].strip(), chip.serial0)
    serial_tty, baud = _serial_console(args, chip)
    if not config.flag("enable_uart"):
        serial_tty = None  # the UART pins are not set up: the kernel's console output goes nowhere
    log = _KernelLog(_loglevel(args), baud if serial_tty else None)
    flavour = chip.flavour if arm64 else chip.flavour32
    release = f"6.6.51+rpt-rpi-{flavour}"
    version = "#1 SMP PREEMPT Debian 1:6.6.51-1+rpt3 (2024-10-08)"
    machine = "aarch64" if arm64 else ("armv6l" if model.name == "cm1" else "armv7l")
    cmdline = " ".join(f"{k}={v}" if v is not None else k for k, v in args)
    cpu = f"0x0000000000 [{chip.cpu}]" if arm64 else "0x0"
    emits = [
        log.line(0.0, f"Booting Linux on physical CPU {cpu}"),
        log.line(0.0, f"Linux version {release} (serge@raspberrypi.com) ({'aarch64' if arm64 else 'arm'}"
                      f"-linux-gnu{'' if arm64 else 'eabihf'}-gcc-12 (Debian 12.2.0-14) 12.2.0, GNU ld (GNU "
                      f"Binutils for Debian) 2.40) {version}"),
        log.line(0.0, f"Machine model: {title}"),
        log.line(0.0, "Reserved memory: created CMA memory pool at 0x000000001ac00000, size 320 MiB"),
        log.line(0.0, "Kernel command line: coherent_pool=1M 8250.nr_uarts=1 snd_bcm2835.enable_headphones=0 "
                      f"bcm2708_fb.fbwidth=0 {cmdline}"),
        log.line(0.0, "Memory: 3734956K/4050944K available (12096K kernel code, 2180K rwdata, 4272K rodata)"),
        log.line(0.05, "SMP: Total of 4 processors activated."),
        log.line(0.3, chip.uart_line),
    ]
    yield Emit(started, "", None)
    yield from emits
    if serial_tty:
        yield log.line(0.0, f"printk: console [{serial_tty}] enabled")
    size_gib = disk.size / 1024**3
    parts = " ".join(f"p{p.index}" for p in disk.layout.partitions) if disk.layout else ""
    yield from log.lines(0.4, [chip.mmc_line, "mmc0: new DDR MMC card at address 0001",
                              f"mmcblk0: mmc0:0001 BJTD4R {size_gib:.2f} GiB"])
    yield from log.lines(0.0, [f" mmcblk0:{' ' + parts if parts else ''}",
                               "mmcblk0boot0: mmc0:0001 BJTD4R 4.00 MiB",
                               "mmcblk0boot1: mmc0:0001 BJTD4R 4.00 MiB"])
    root_arg = dict(args).get("root") or ""
    root = _resolve_root(root_arg, disk.layout)
    wait = _rootwait(args)
    if root is None and wait is not None:
        yield log.line(0.0, f"Waiting for root device {root_arg}...")
        if wait == float("inf"):
            return Stuck(f"waiting for root device {root_arg}")
        log.now += wait
        yield Emit(wait, "", None)
    if root is None:
        return (yield from _panic(log, args, disk, root_arg, "0,0", title, release, version, -6))
    if not ext4.is_ext4(disk.image, root):
        yield from log.lines(0.02, [f"EXT4-fs (mmcblk0p{root.index}): VFS: Can't find ext4 filesystem"], 3)
        return (yield from _panic(log, args, disk, root_arg, f"{MMC_MAJOR},{root.index}", title, release,
                                  version, -22))
    yield from log.lines(0.05, [
        f"EXT4-fs (mmcblk0p{root.index}): mounted filesystem with ordered data mode. Quota mode: none.",
        f"VFS: Mounted root (ext4 filesystem) readonly on device {MMC_MAJOR}:{root.index}.",
        "devtmpfs: mounted", "Freeing unused kernel memory: 4096K", "Run /sbin/init as init process"])

    def read(path: str) -> bytes | None:
        try:
            return ext4.read_file(disk.image, root, path)
        except HilError:
            return None

    hostname = (read("/etc/hostname") or b"localhost").decode("utf-8", "replace").strip() or "localhost"
    os_release = _os_release(read("/etc/os-release") or b"")
    pretty = os_release.get("PRETTY_NAME", "Linux")
    console_is_serial = bool(serial_tty) and _last_console(args, chip) == serial_tty
    if console_is_serial and log.loglevel > 4:  # systemd's status goes to /dev/console, the last console=
        yield from log.lines(0.6, ["systemd[1]: systemd 252.33-1~deb12u1 running in system mode "
                                   "(+PAM +AUDIT +SELINUX +APPARMOR +IMA +SMACK +SECCOMP)",
                                   f"systemd[1]: Detected architecture {'arm64' if arm64 else 'arm'}."])
        yield Emit(0.0, f"\nWelcome to {pretty}!\n\n", baud)
        log.now += 0.1
        yield from log.lines(0.0, [f"systemd[1]: Hostname set to <{hostname}>."])
        for unit, text in (("systemd-journald.service", "Journal Service"),
                           ("systemd-udevd.service", "Rule-based Manager for Device Events and Files"),
                           ("systemd-fsck-root.service", "File System Check on Root Device"),
                           ("systemd-remount-fs.service", "Remount Root and Kernel File Systems"),
                           ("ssh.service", "OpenBSD Secure Shell server"),
                           (f"serial-getty@{serial_tty}.service", f"Serial Getty on {serial_tty}")):
            yield Emit(0.9, f"[  OK  ] Started {unit} - {text}.\n", baud)
        yield Emit(0.5, "[  OK  ] Reached target multi-user.target - Multi-User System.\n", baud)
    if serial_tty is None:
        yield Emit(8.0, "", None)
        return Stuck("running, but without a serial console (enable_uart, console=)")
    issue_raw = read("/etc/issue")
    if issue_raw is None:  # Debian composes /etc/issue from os-release; stand-in images may lack it
        name = f"{os_release.get('NAME', 'Linux')} {os_release.get('VERSION_ID', '')}"
        issue_raw = f"{name} \\n \\l\n\n".encode()
    proc = {
        "/proc/device-tree/model": title.encode() + b"\0",
        "/sys/firmware/devicetree/base/model": title.encode() + b"\0",
        "/proc/cmdline": (cmdline + "\n").encode(),
        "/proc/version": f"Linux version {release} (serge@raspberrypi.com) {version}\n".encode(),
    }
    escapes = {"n": hostname, "l": serial_tty, "s": "Linux", "r": release, "m": machine, "\\": "\\"}
    issue = re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), ""), issue_raw.decode("utf-8", "replace"))
    yield Emit(max(0.5, 9.0 - log.now), "", None)  # services start; getty comes last
    return System(disk.image, root, hostname, serial_tty, baud, release, version, machine, issue,
                  console_is_serial and log.loglevel > 4, proc)


def _panic(log: _KernelLog, args: list[tuple[str, str | None]], disk: BootDisk, root_arg: str, block: str,
           title: str, release: str, version: str, error: int) -> BootLog:
    reason = f"VFS: Unable to mount root fs on unknown-block({block})"
    listing = []
    if disk.layout:
        listing.append(f"b300 {disk.size // 1024:16d} mmcblk0 ")
        listing.append(" driver: mmcblk")
        for p in disk.layout.partitions:
            listing.append(f"  b30{p.index} {p.size // 1024:16d} mmcblk0p{p.index} "
                           f"{partuuid(disk.layout.disk_id, p.index)}")
    emits = [
        log.line(0.02, f'VFS: Cannot open root device "{root_arg}" or unknown-block({block}): '
                       f"error {error}", 0),
        log.line(0.0, 'Please append a correct "root=" boot option; here are the available partitions:', 0),
        *(log.line(0.0, line, 0) for line in listing),
        log.line(0.0, f"Kernel panic - not syncing: {reason}", 0),
        log.line(0.0, f"CPU: 0 PID: 1 Comm: swapper/0 Not tainted {release} {version}", 0),
        log.line(0.0, f"Hardware name: {title} (DT)", 0),
        log.line(0.0, f"---[ end Kernel panic - not syncing: {reason} ]---", 0),
    ]
    yield from emits
    seconds = dict(args).get("panic")
    try:
        delay = int(seconds or 0)
    except ValueError:
        delay = 0
    if delay > 0:
        yield Emit(float(delay), "", None)
        return Reboot()
    return Stuck("kernel panic")


def kernel_name(model: ModuleModel, chip: Chip, config: BootConfig) -> str:
    if config.get("kernel"):
        return config.get("kernel")
    files = boot_files(model.name)
    if files.arm64 and chip.kernel32 and not config.flag("arm_64bit", model.name in ("cm4", "cm4s")):
        return chip.kernel32
    return files.kernel


def _runs(kernel: bytes, arm64: bool) -> bool:
    """The header the CPU needs in the mode the firmware starts it in."""
    if arm64:
        return kernel[0x38:0x3C] == ARM64_MAGIC
    return len(kernel) >= 0x28 and struct.unpack_from("<I", kernel, 0x24)[0] == ZIMAGE_MAGIC


def fdt_model(blob: bytes) -> str | None:
    """The root node's ``model`` of a flattened device tree; None if it is not a device tree."""
    if len(blob) < 40:
        return None
    magic, total, off_struct, off_strings = struct.unpack_from(">4I", blob, 0)
    if magic != FDT_MAGIC or total > len(blob):
        return None
    pos, depth = off_struct, 0
    try:
        while pos + 4 <= total:
            token, = struct.unpack_from(">I", blob, pos)
            pos += 4
            if token == 1:  # BEGIN_NODE: a NUL-terminated name, padded to 4
                end = blob.index(b"\0", pos)
                pos = (end + 4) & ~3
                depth += 1
            elif token == 2:
                depth -= 1
            elif token == 3:
                length, name_off = struct.unpack_from(">II", blob, pos)
                value = blob[pos + 8:pos + 8 + length]
                pos = (pos + 8 + length + 3) & ~3
                name = blob[off_strings + name_off:blob.index(b"\0", off_strings + name_off)]
                if depth == 1 and name == b"model":
                    return value.rstrip(b"\0").decode("utf-8", "replace")
            elif token == 9:
                break
            elif token != 4:
                return None
    except (ValueError, struct.error):
        return None
    return "Raspberry Pi"


def kernel_args(line: str, serial0: str) -> list[tuple[str, str | None]]:
    """cmdline.txt as the kernel sees it: the firmware replaces serial0/serial1 with the real tty."""
    args: list[tuple[str, str | None]] = []
    for word in line.split():
        key, sep, value = word.partition("=")
        if key == "console" and value.split(",")[0] == "serial0":
            value = serial0 + value[len("serial0"):]
        args.append((key, value if sep else None))
    return args


def _serial_console(args: list[tuple[str, str | None]], chip: Chip) -> tuple[str | None, int]:
    """The console= naming the UART the rig listens on, and its baud rate (Linux's default 9600)."""
    found: tuple[str | None, int] = (None, 9600)
    for key, value in args:
        if key != "console" or not value:
            continue
        name, _, options = value.partition(",")
        if name == chip.serial0:
            digits = re.match(r"\d+", options)
            found = (name, int(digits.group()) if digits else 9600)
    return found


def _last_console(args: list[tuple[str, str | None]], chip: Chip) -> str | None:
    consoles = [v.partition(",")[0] for k, v in args if k == "console" and v]
    return consoles[-1] if consoles else None


def _loglevel(args: list[tuple[str, str | None]]) -> int:
    level = 7
    for key, value in args:
        if key == "quiet":
            level = 4
        elif key == "loglevel" and value and value.isdigit():
            level = int(value)
    return level


def _rootwait(args: list[tuple[str, str | None]]) -> float | None:
    """None: no rootwait; inf: wait for ever; else the seconds ``rootwait=N`` allows."""
    wait: float | None = None
    for key, value in args:
        if key == "rootwait":
            try:
                wait = float(value) if value else float("inf")
            except ValueError:
                wait = float("inf")
    return wait


def _resolve_root(root: str, layout: DiskLayout | None) -> Partition | None:
    if layout is None:
        return None
    by_partuuid = re.fullmatch(r"PARTUUID=([0-9a-fA-F]{8})-(\d{2})", root)
    if by_partuuid:
        if int(by_partuuid.group(1), 16) != layout.disk_id:
            return None
        index = int(by_partuuid.group(2))
    else:
        by_name = re.fullmatch(r"/dev/mmcblk0p(\d+)", root)
        if not by_name:
            return None
        index = int(by_name.group(1))
    return next((p for p in layout.partitions if p.index == index), None)


def _os_release(data: bytes) -> dict[str, str]:
    values = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            values[key.strip()] = value.strip().strip('"')
    return values


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").replace("\0", " ")

