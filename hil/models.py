"""What each Compute Module model is, as far as a rig cares.

Facts from ../shared/docs/usbboot-protocol.md section 1: USB identities of the boot ROM and second stage,
the second-stage file each ROM wants, and the per-chip subfolder name used by the file server.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

BROADCOM_VID = 0x0A5C
MSD_PID = 0x0001  # legacy msd/start.elf mass storage
GADGET_PID = 0x0104  # mass-storage-gadget64 (Linux configfs gadget)

GB = 1000**3


@dataclass(frozen=True)
class ModuleModel:
    name: str
    chip: str  # bcm2835, bcm2837, bcm2711, bcm2712
    rom_pid: int
    rom_product: str
    rom_iserial: int  # descriptor index: 0 (no serial) or 3
    stage2_pid: int
    stage2_product: str
    stage2_iserial: int
    second_stage: str  # file the ROM is sent
    chip_dir: str  # per-chip folder in payloads / bootfiles.bin
    has_eeprom: bool  # SPI bootloader EEPROM (CM4, CM5)
    emmc_sizes: tuple[int, ...]  # nominal sizes sold, bytes (decimal GB as printed on the box)
    rom_full_speed: bool  # the BCM2835 ROM enumerates at full speed


_BCM2835 = ModuleModel(
    name="cm1", chip="bcm2835", rom_pid=0x2763, rom_product="BCM2708 Boot", rom_iserial=0,
    stage2_pid=0x2764, stage2_product="BCM2710 Boot", stage2_iserial=1, second_stage="bootcode.bin",
    chip_dir="2710", has_eeprom=False, emmc_sizes=(4 * GB,), rom_full_speed=True,
)
_BCM2837 = replace(_BCM2835, name="cm3", chip="bcm2837", rom_pid=0x2764, rom_product="BCM2710 Boot",
                   rom_full_speed=False)
_BCM2711 = replace(
    _BCM2837, name="cm4", chip="bcm2711", rom_pid=0x2711, rom_product="BCM2711 Boot", rom_iserial=3,
    stage2_pid=0x2711, stage2_product="BCM2711 Boot", stage2_iserial=4, second_stage="bootcode4.bin",
    chip_dir="2711", has_eeprom=True, emmc_sizes=(8 * GB, 16 * GB, 32 * GB),
)
_BCM2712 = replace(
    _BCM2711, name="cm5", chip="bcm2712", rom_pid=0x2712, rom_product="BCM2712D0 Boot", stage2_pid=0x2712,
    stage2_product="BCM2712 Boot", second_stage="bootcode5.bin", chip_dir="2712",
    emmc_sizes=(16 * GB, 32 * GB, 64 * GB),
)

MODELS: dict[str, ModuleModel] = {
    m.name: m
    for m in (
        _BCM2835,
        _BCM2837,
        replace(_BCM2837, name="cm3+", emmc_sizes=(8 * GB, 16 * GB, 32 * GB)),
        _BCM2711,
        # CM4S keeps the BCM2711 ROM but has no SPI EEPROM: it loads its bootloader like a CM3.
        replace(_BCM2711, name="cm4s", has_eeprom=False),
        _BCM2712,
    )
}

ROM_PIDS = frozenset(m.rom_pid for m in MODELS.values())


def emmc_size_plausible(model: ModuleModel, size: int) -> bool:
    """A real eMMC reports a little less than the decimal size on the box (user area, boot partitions)."""
    return any(0.85 * nominal <= size <= nominal for nominal in model.emmc_sizes)
