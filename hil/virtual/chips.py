"""Per-model facts a virtual module's boot log shows (board revision, CPU, UART, MMC controller)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass


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



def serial_number(rig_name: str) -> int:
    """A board serial number, the same for every run of a rig (OTP on a real module)."""
    return zlib.crc32(rig_name.encode()) | 0x10000000

