"""Synthetic payload folders shaped like Raspberry Pi's own (usbboot 87d6e03), generated here.

Raspberry Pi's files are not ours to ship, so tests write files with the same structure and made-up content:
the folder layouts of ``msd/`` and ``mass-storage-gadget64/`` (``bootfiles.bin`` a ustar archive with a
``2711/`` and a ``2712/`` set), and per file what a genuine one has (see :mod:`hil.virtual.usb.genuine`):

* a second stage: 512 zero bytes, then code; somewhere in it its USB device descriptor (VID 0x0a5c, the
  chip's second-stage PID), its product as a UTF-16LE USB string, and the strings of its kind;
* ``bootmain`` and ``msd/start.elf``: VideoCore ELF executables (machine 137); the msd firmware carries
  SCSI read/write handlers;
* ``boot.img``: a FAT file system image with files in it, made with mtools as ``mkfs.fat -C`` would.

Sizes are those of the real files at that commit, so transfers cost what real ones cost.
"""

from __future__ import annotations

import io
import random
import struct
import subprocess
import tarfile
from pathlib import Path

STAGE2 = {"2710": (0x2764, "BCM2710 Boot", 1), "2711": (0x2711, "BCM2711 Boot", 4),
          "2712": (0x2712, "BCM2712 Boot", 4)}  # second-stage PID, product string, iSerialNumber index
MARKERS = {"msd": (b"RPIBOOT", b"USB-MSD", b"BCM-USB-MSD", b"Verify BOOT EEPROM", b"start4.elf"),
           "recovery": (b"Verify BOOT EEPROM", b"BOOT-EEPROM: UPDATED", b"RECOVERY", b"pieeprom"),
           "bootfiles": (b"bootmain", b"BOOTSYS", b"mcb.bin", b"memsys"),
           "loader": (b"config.txt", b"start.elf", b"boot_ramdisk", b"RECOVERYELF")}


def _spread(size: int, seed: str, pieces: list[bytes]) -> bytes:
    """``size`` bytes of filler with ``pieces`` placed at spread-out offsets."""
    rng = random.Random(seed)
    out = bytearray(rng.randbytes(size))
    step = size // (len(pieces) + 1)
    for i, piece in enumerate(pieces, 1):
        out[i * step:i * step + len(piece)] = piece
    return bytes(out)


def second_stage(chip: str, kind: str, size: int) -> bytes:
    """A second stage of ``kind`` ("msd", "recovery", "bootfiles" or "loader") for ``chip``."""
    pid, product, iserial = STAGE2[chip]
    descriptor = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, 0x0A5C, pid, 0, 1, 2, iserial, 1)
    string = bytes((2 + 2 * len(product), 3)) + product.encode("utf-16-le")
    return bytes(512) + _spread(size - 512, f"{chip}/{kind}", [descriptor, string, *MARKERS[kind]])


def videocore_elf(seed: str, size: int, *markers: bytes) -> bytes:
    """A VideoCore ELF executable header (32-bit, little-endian, ET_EXEC, machine 137) and filler."""
    header = struct.pack("<4sBBBB8xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 2, 137, 1, 0xC0000200, 52, 0, 0,
                         52, 32, 1, 40, 0, 0)
    return header + _spread(size - len(header), seed, list(markers))


def fat_image(path: Path, size: int, files: dict[str, bytes]) -> None:
    """A FAT file system of ``size`` bytes at ``path`` (no partition table) holding ``files``."""
    subprocess.run(["mformat", "-C", "-T", str(size // 512), "-i", str(path), "::"], check=True, capture_output=True)
    for name, data in files.items():
        source = path.with_name(f".{name}")
        source.write_bytes(data)
        subprocess.run(["mcopy", "-i", str(path), str(source), f"::{name}"], check=True, capture_output=True)
        source.unlink()


def msd_folder(root: Path) -> Path:
    """``msd/``: bootcode.bin (2835/2837 loader), bootcode4.bin (the 2711 msd bootloader), start.elf."""
    out = root / "msd"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bootcode.bin").write_bytes(second_stage("2710", "loader", 52_624))
    (out / "bootcode4.bin").write_bytes(second_stage("2711", "msd", 105_984))
    (out / "start.elf").write_bytes(videocore_elf("msd/start.elf", 536_536, b"scsi_inquiry", b"scsi_read",
                                                  b"scsi_write"))
    return out


def gadget_folder(root: Path, boot_img_size: int = 4 * 1024 * 1024) -> Path:
    """``mass-storage-gadget64/``: bootfiles.bin, config.txt (boot_ramdisk=1) and boot.img (FAT)."""
    out = root / "mass-storage-gadget64"
    out.mkdir(parents=True, exist_ok=True)
    members: dict[str, bytes] = {}
    for chip, bootcode, memsys, extra in (("2711", "bootcode4.bin", 9, ()),
                                          ("2712", "bootcode5.bin", 4, ("bootsys-ab.bin", "rp1c0fw1.bin",
                                                                        "rp1c0fw2.bin"))):
        members[f"{chip}/{bootcode}"] = second_stage(chip, "bootfiles", 73_120 if chip == "2711" else 78_332)
        members[f"{chip}/mcb.bin"] = random.Random(f"{chip}/mcb").randbytes(11_696)
        for i in range(memsys):
            members[f"{chip}/memsys{i:02d}.bin"] = random.Random(f"{chip}/memsys{i}").randbytes(20_492)
        members[f"{chip}/bootmain"] = videocore_elf(f"{chip}/bootmain", 265_712, b"boot_ramdisk", b"boot.img")
        for name in ("logo.bin", "font.bin", *extra):
            members[f"{chip}/{name}"] = random.Random(f"{chip}/{name}").randbytes(12_844)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (out / "bootfiles.bin").write_bytes(buffer.getvalue())
    (out / "config.txt").write_text("# Load boot.img containing the Linux initramfs\nboot_ramdisk=1\n"
                                    "uart_2ndstage=1\n")
    fat_image(out / "boot.img", boot_img_size, {"config.txt": b"arm_64bit=1\n", "cmdline.txt": b"console=tty1\n",
                                                 "kernel8.img": random.Random("kernel").randbytes(65_536)})
    return out


def recovery_bin(chip: str) -> bytes:
    """``recovery.bin`` (``recovery/bootcode4.bin``, ``recovery5/bootcode5.bin``)."""
    return second_stage(chip, "recovery", 100_140 if chip == "2711" else 105_420)
