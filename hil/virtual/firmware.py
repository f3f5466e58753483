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
value says how the boot ended. The stages live in their own modules: :mod:`hil.virtual.bootloader` (the
CM4/CM5 EEPROM), :mod:`hil.virtual.kernel` (kernel to getty), :mod:`hil.virtual.bootdisk` (what the ROM
reads), :mod:`hil.virtual.chips` (per-model facts) and :mod:`hil.virtual.bootlog` (their vocabulary).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hil.image.bootfs import boot_files
from hil.models import ModuleModel
from hil.virtual.bootdisk import BootConfig, BootDisk
from hil.virtual.bootloader import bootloader
from hil.virtual.bootlog import BOOTLOADER_BAUD, BootLog, Emit, Outcome, Reboot, Stuck, System, UsbFallback
from hil.virtual.chips import CHIPS, Chip, serial_number
from hil.virtual.eeprom import Bootloader
from hil.virtual.kernel import fdt_model, kernel, kernel_args, kernel_name

__all__ = ["BOOTLOADER_BAUD", "CHIPS", "BootConfig", "BootDisk", "BootLog", "Bootloader", "Chip", "Emit", "Outcome",
           "Reboot", "Stuck", "System", "UsbFallback", "boot", "fdt_model", "kernel_args", "kernel_name",
           "serial_number"]


def boot(model: ModuleModel, image: Path, serial: int, eeprom: Bootloader | None = None, *,
         uart: str = "") -> BootLog:
    """The UART output of one boot from the eMMC image at ``image``; returns how the boot ends.

    ``eeprom`` is the bootloader a CM4/CM5's EEPROM holds (None: no valid one, e.g. after a torn update).
    ``uart``: the UART the console is wired to where a model has a choice (CM5: "uart10", the debug header
    and its default console, or "uart0" on GPIO14/15); what goes to the other UART is not seen."""
    chip = CHIPS[model.name]
    if uart == "uart0" and model.name == "cm5":
        chip = replace(chip, serial0="ttyAMA0")
    disk = BootDisk(image)
    if not model.has_eeprom and model.name != "cm5":
        return (yield from _gpu_boot(model, chip, disk))
    if eeprom is None:  # the ROM finds no bootloader in the SPI flash: silence, then it waits on USB
        yield Emit(0.3, "", None)
        return UsbFallback()
    return (yield from bootloader(model, chip, disk, serial, eeprom))


def _gpu_boot(model: ModuleModel, chip: Chip, disk: BootDisk) -> BootLog:
    """CM1/CM3 (and the EEPROM-less CM4S): the ROM loads bootcode.bin, the GPU firmware says nothing."""
    files = boot_files(model.name)
    if disk.boot_file(files.firmware[0]) is None:
        yield Emit(0.2, "", None)  # the ROM looks, finds no second stage on the eMMC
        return UsbFallback()
    if any(disk.boot_file(name) is None for name in files.firmware[1:]):
        return Stuck("bootcode.bin found no GPU firmware")  # the activity LED blinks, the UART is quiet
    return (yield from kernel(model, chip, disk, started=3.2))

