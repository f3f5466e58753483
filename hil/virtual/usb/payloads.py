"""Stand-in rpiboot payload folders, laid out like Raspberry Pi's usbboot repository.

The real payload binaries are Raspberry Pi's and not ours to ship, and the virtual module cannot run
VideoCore code anyway. A stand-in file starts with a header naming the chip family, the program and the
file, then deterministic filler up to a realistic size, so transfers cost what real ones cost and any
corruption on the way shows. The virtual boot ROM runs a stand-in second stage only for its own chip
(see :mod:`hil.virtual.usb.bootrom`); Raspberry Pi's own files are recognised by their structure instead
(:mod:`hil.virtual.usb.genuine`).
"""

from __future__ import annotations

import io
import random
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

from hil.eeprom.pieeprom import IMAGE_SIZES, embed_config
from hil.eeprom.sig import sig_text
from hil.errors import InputError
from hil.models import MODELS
from hil.virtual.eeprom import FACTORY_CONFIG, LATEST, RECOVERY_CONFIG, release_image

MAGIC = b"CM-HIL STAND-IN\0"
_HEADER = struct.Struct("<16s4s12s32s")  # magic, chip family ("2711"), program, file name
PROGRAMS = ("msd", "gadget", "recovery")  # the second-stage programs the virtual module can run

KINDS = ("msd", "mass-storage-gadget64", "recovery", "recovery5")
BOOT_IMG_SIZE = 31_457_792  # the 30 MiB ramdisk of mass-storage-gadget64 (#318)
EEPROM_SIZE = IMAGE_SIZES
SIG_TIMESTAMP = 1_700_000_000
_BOOTCODE = {"2710": "bootcode.bin", "2711": "bootcode4.bin", "2712": "bootcode5.bin"}
MEMSYS_COUNT = {"2711": 9, "2712": 4}  # memsys00..08 / memsys00..03 in bootfiles.bin


@dataclass(frozen=True)
class StandIn:
    """A program the virtual module can run: a stand-in's header, or a genuine file recognised by structure
    (:mod:`hil.virtual.usb.genuine`)."""

    chip: str  # "2710" (BCM2835/2836/2837), "2711" or "2712": the per-chip folder name
    program: str
    name: str
    genuine: bool = False


def stand_in(chip: str, program: str, name: str, size: int) -> bytes:
    """A stand-in file of exactly ``size`` bytes (at least the header)."""
    header = _HEADER.pack(MAGIC, chip.encode(), program.encode(), name.encode())
    filler = random.Random(f"{chip}/{program}/{name}").randbytes(max(0, size - len(header)))
    return header + filler


def read_stand_in(data: bytes) -> StandIn | None:
    """The header of a stand-in file, or None for anything else (a real Raspberry Pi binary)."""
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        return None
    _, chip, program, name = _HEADER.unpack_from(data)
    return StandIn(*(f.rstrip(b"\0").decode("ascii", "replace") for f in (chip, program, name)))


def eeprom_sig(image: bytes) -> bytes:
    """``pieeprom.sig`` as ``rpi-eeprom-digest`` writes it: SHA-256 hex line and a timestamp line."""
    return sig_text(image, SIG_TIMESTAMP).encode()


def make_payload(dir: Path, kind: str, models: tuple[str, ...] = ("cm1", "cm3", "cm4", "cm5"), *,
                 boot_img_size: int = BOOT_IMG_SIZE) -> Path:
    """Create ``dir/<kind>/`` with stand-ins for the given models' chips and return that folder.

    ``msd`` covers 2710 and 2711 (usbboot ships no 2712 msd); ``mass-storage-gadget64`` covers 2711 and
    2712; ``recovery`` is 2711 only and ``recovery5`` 2712 only, whatever ``models`` says.
    """
    if kind not in KINDS:
        raise InputError(f"unknown payload kind {kind!r}; use one of {', '.join(KINDS)}", stage="payload")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise InputError(f"unknown module model(s) {', '.join(unknown)}; use {', '.join(MODELS)}",
                         stage="payload")
    chips = {MODELS[m].chip_dir for m in models}
    out = Path(dir) / kind
    out.mkdir(parents=True, exist_ok=True)
    if kind == "msd":
        for chip, firmware in (("2710", "start.elf"), ("2711", "start4.elf")):
            if chip in chips:
                size = 52_456 if chip == "2710" else 97_632
                _write(out, _BOOTCODE[chip], stand_in(chip, "msd", _BOOTCODE[chip], size))
                _write(out, firmware, stand_in(chip, "msd-firmware", firmware, 2_983_264))
    elif kind == "mass-storage-gadget64":
        _write(out, "bootfiles.bin", _bootfiles(sorted(chips & {"2711", "2712"})))
        _write(out, "config.txt", b"# mass-storage-gadget64 (cm-hil stand-in)\nboot_ramdisk=1\n")
        _write(out, "boot.img", stand_in("any", "gadget-ramdisk", "boot.img", boot_img_size))
    else:
        chip = "2711" if kind == "recovery" else "2712"
        size = 113_512 if chip == "2711" else 174_208
        _write(out, _BOOTCODE[chip], stand_in(chip, "recovery", "recovery.bin", size))
        uart = "" if chip == "2711" else "uart_2ndstage=1\n"
        config = f"# recovery (cm-hil stand-in)\n{uart}#recovery_reboot=1\n#recovery_metadata=0\n"
        _write(out, "config.txt", config.encode())
        model = MODELS["cm4" if chip == "2711" else "cm5"]
        original = release_image(model, LATEST[model.name], FACTORY_CONFIG[model.name])
        _write(out, "pieeprom.original.bin", original)  # as usbboot's recovery folders: the release as shipped
        _write(out, "boot.conf", RECOVERY_CONFIG[model.name].encode())
        image = embed_config(original, RECOVERY_CONFIG[model.name], model)  # what update-pieeprom.sh makes
        _write(out, "pieeprom.bin", image)
        _write(out, "pieeprom.sig", eeprom_sig(image))
    return out


def _bootfiles(chips: list[str]) -> bytes:
    """``bootfiles.bin``: a ustar archive with one DDR-init/bootmain set per chip."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for chip in chips:
            size = 98_304 if chip == "2711" else 131_072
            files = {_BOOTCODE[chip]: stand_in(chip, "gadget", _BOOTCODE[chip], size),
                     "mcb.bin": stand_in(chip, "ddr", "mcb.bin", 16_384),
                     **{f"memsys{i:02d}.bin": stand_in(chip, "ddr", f"memsys{i:02d}.bin", 8_192)
                        for i in range(MEMSYS_COUNT[chip])},
                     "bootmain": stand_in(chip, "bootmain", "bootmain", 262_144)}
            for name, data in files.items():
                info = tarfile.TarInfo(f"{chip}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)
