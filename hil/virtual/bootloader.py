"""The CM4/CM5 EEPROM bootloader of a virtual module: its UART report, BOOT_ORDER walk and SD (eMMC) mode."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from hil.image import fat
from hil.image.bootfs import boot_files
from hil.models import ModuleModel
from hil.virtual.bootdisk import BootConfig, BootDisk
from hil.virtual.bootlog import BootLog, Emit, NothingToBoot, Outcome, Stuck
from hil.virtual.chips import CHIPS, Chip
from hil.virtual.eeprom import Bootloader
from hil.virtual.kernel import kernel, kernel_name

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


@dataclass(frozen=True)
class Handover:
    """The bootloader starts the kernel (``started`` hardware seconds on), with this config.txt."""

    started: float
    config: BootConfig


def bootloader(model: ModuleModel, chip: Chip, disk: BootDisk, serial: int, eeprom: Bootloader) -> BootLog:
    """CM4/CM5: the EEPROM bootloader, then the kernel it starts. It reports every step on the UART only
    with BOOT_UART=1 (the factory config has 0); it walks its BOOT_ORDER (forever, with RESTART) and a mode
    that finds nothing to boot hands over to the next."""
    steps = _bootloader(model, chip, disk, serial, eeprom)
    heard = eeprom.config.boot_uart and chip.serial0 == CHIPS[model.name].serial0  # CM5: on UART10 only
    ended = yield from (_stamped(steps) if heard else _silent(steps))
    if isinstance(ended, Handover):
        return (yield from kernel(model, chip, disk, started=ended.started, config=ended.config))
    return ended


def _stamped(steps: Generator[Emit, None, Outcome | Handover]) -> Generator[Emit, None, Outcome | Handover]:
    """Each line after the seconds since power-on, as recent bootloaders print them ("  4.27 RPi: BOOTLOADER
    release ..." in a CM5 log, agherzan/meta-raspberrypi#1526; a CM4's in raspberrypi/rpi-eeprom#668)."""
    now, fresh = 0.0, True
    while True:
        try:
            e = next(steps)
        except StopIteration as end:
            return end.value
        now += e.delay
        text = []
        for ch in e.text:
            if fresh and ch != "\n":
                text.append(f"{now:6.2f} ")
            text.append(ch)
            fresh = ch == "\n"
        yield Emit(e.delay, "".join(text), e.baud)


def _silent(steps: Generator[Emit, None, Outcome | Handover]) -> Generator[Emit, None, Outcome | Handover]:
    """The same steps, taking the same time, with nothing on the UART (BOOT_UART=0)."""
    while True:
        try:
            e = next(steps)
        except StopIteration as end:
            return end.value
        yield Emit(e.delay, "", None)


def _bootloader(model: ModuleModel, chip: Chip, disk: BootDisk, serial: int,
                eeprom: Bootloader) -> Generator[Emit, None, Outcome | Handover]:
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
                outcome: Outcome | NothingToBoot | Handover = yield from _sd_mode(model, chip, disk)
                if not isinstance(outcome, NothingToBoot):
                    return outcome
                continue
            seconds, lines = _EMPTY_MODES.get(mode, (0.2, ("Unknown boot mode",)))
            for n, line in enumerate(lines):
                yield Emit(seconds if n == len(lines) - 1 else 0.02, line + "\n")


def _sd_mode(model: ModuleModel, chip: Chip,
             disk: BootDisk) -> Generator[Emit, None, Outcome | NothingToBoot | Handover]:
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
        return NothingToBoot()
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
    # the recovery files first, then the firmware (a CM4 log: talos-rpi5/talos-builder#19)
    yield Emit(0.01, "[sdcard] recover4.elf not found\n[sdcard] recovery.elf not found\n")
    missing = [name for name in files.firmware if disk.boot_file(name) is None]
    if missing:
        yield Emit(0.02, "".join(f"[sdcard] {name} not found\n" for name in (files.firmware[0], "start.elf"))
                   + "Firmware not found\nERROR: 4\nFinished partition walk\n")
        return NothingToBoot()
    for name in files.firmware:
        data = disk.boot_file(name) or b""
        yield Emit(0.02 + len(data) / 25e6, f"Read {name} bytes {len(data):8d} hnd 0x0\n")
    yield Emit(0.02, f"0x00{chip.boardrev} 0x00000000 0x00000fff\nMEM GPU: 76 ARM: 948 TOTAL: 1024\n")
    yield Emit(0.01, "Firmware: 82f3750a65fadae9a38077e3c2e217ad158c8d54 Mar 17 2023 10:50:39\n")
    yield Emit(0.01, f"Starting {files.firmware[0]} @ 0xfec00200 partition 0\n")
    return Handover(1.6, config)


def _load_kernel_from_bootloader(model: ModuleModel, chip: Chip, disk: BootDisk,
                                 config: BootConfig) -> Generator[Emit, None, Outcome | NothingToBoot | Handover]:
    name = kernel_name(model, chip, config)
    data = disk.boot_file(name)
    if data is None:
        yield Emit(0.02, f"Error -2 loading '{name}'\nBoot failed: no kernel found on partition 0\n")
        return NothingToBoot()
    yield Emit(0.02 + len(data) / 25e6,
               f"Loading '{name}' to 0x00000000 offset 0x200000 size 0x{len(data):x}\n")
    dtb = config.get("device_tree", boot_files(model.name).dtb)
    yield Emit(0.02, f"Loaded '{dtb}' to 0x2efec100 size 0x{len(disk.boot_file(dtb) or b''):x}\n")
    yield Emit(0.05, "Starting OS 1814 ms\n")
    return Handover(0.3, config)



def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").replace("\0", " ")

