"""Raspberry Pi's own payload files, recognised by their structure so the virtual module can act as they do.

The virtual module cannot run VideoCore code, but it can tell what a genuine file is and do what that
program does on hardware. What marks each kind was read from the files in Raspberry Pi's public usbboot
(87d6e03: ``msd/``, ``firmware/2711/bootcode4.bin``, ``firmware/bootfiles.bin``) and rpi-eeprom (86759b0:
``firmware-2711/latest/recovery.bin``, ``firmware-2712/latest/recovery.bin``) repositories; none of their
bytes are in this project, and tests build synthetic files with the same structure.

A genuine second stage (``bootcode.bin``, ``bootcode4.bin``, ``bootcode5.bin``, ``recovery.bin``):

* starts with a 512-byte block of zeros, the program following at 0x200;
* carries the USB device descriptor it enumerates with: USB 2.0, class 0, 64-byte EP0, VID 0x0a5c and the
  second stage's PID for its chip (0x2764 for 2835/2837, 0x2711, 0x2712), which names the chip;
* carries its product string ("BCM2710 Boot", ...) as a UTF-16LE USB string.

Which program it is (the strings each kind carries, and no other kind does):

* ``USB-MSD`` : the 2711 msd bootloader (``msd/bootcode4.bin``), a mass-storage device of its own;
* ``Verify BOOT EEPROM`` without ``USB-MSD``: ``recovery.bin`` (``recovery/``, ``recovery5/``);
* ``bootmain``: the DDR-init loader of ``bootfiles.bin`` (mass-storage-gadget64), which loads bootmain;
* a 2835/2837 second stage naming ``start.elf``: the ``msd/bootcode.bin`` loader, which runs ``start.elf``.

Follow-on files: ``start.elf`` of ``msd/`` and ``bootmain`` are VideoCore ELF programs (32-bit
little-endian ELF, machine 137); the msd firmware carries a USB mass-storage device (SCSI read and write
handlers). ``boot.img`` of mass-storage-gadget64 is a FAT file system image (``rpi-make-boot-image``).
"""

from __future__ import annotations

import struct

from hil.image.fat import boot_sector_type
from hil.models import MODELS
from hil.virtual.usb.payloads import StandIn

HEADER_BLOCK = 0x200
VENDOR = 0x0A5C
ELF_VIDEOCORE = 137
_STAGE2 = {m.stage2_pid: (m.chip_dir, m.stage2_product) for m in MODELS.values()}  # PID -> chip, product


def _descriptor(pid: int) -> bytes:
    """The second stage's device descriptor up to idProduct, as the files carry it."""
    return struct.pack("<BBHBBBBHH", 18, 1, 0x0200, 0, 0, 0, 64, VENDOR, pid)


def second_stage(data: bytes) -> StandIn | None:
    """The program a genuine Raspberry Pi second stage is (chip from its descriptor), or None when ``data``
    does not have that structure. A genuine file of no kind modelled here gets program "unknown"."""
    if len(data) <= HEADER_BLOCK or any(data[:HEADER_BLOCK]) or not any(data[HEADER_BLOCK:HEADER_BLOCK + 64]):
        return None
    found = [(chip, product) for pid, (chip, product) in _STAGE2.items() if _descriptor(pid) in data]
    if len(found) != 1 or found[0][1].encode("utf-16-le") not in data:
        return None
    chip = found[0][0]
    if b"USB-MSD" in data:
        program = "msd"
    elif b"Verify BOOT EEPROM" in data:
        program = "recovery"
    elif b"bootmain" in data and chip != "2710":
        program = "gadget"
    elif b"start.elf" in data and chip == "2710":
        program = "msd"
    else:
        program = "unknown"
    return StandIn(chip, program, "genuine", genuine=True)


def videocore_elf(data: bytes) -> bool:
    """A VideoCore ELF program: 32-bit, little-endian, executable, machine 137."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4:6] != b"\x01\x01":
        return False
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    return e_type == 2 and e_machine == ELF_VIDEOCORE


def msd_firmware(data: bytes) -> bool:
    """The msd folder's ``start.elf``: a VideoCore program that is a USB mass-storage device."""
    return videocore_elf(data) and b"scsi_read" in data and b"scsi_write" in data


def fat_image(data: bytes) -> bool:
    """A FAT file system image from its first byte (``boot.img``), as ``mkfs.fat -C`` makes one."""
    return boot_sector_type(data[:512], len(data)) is not None
