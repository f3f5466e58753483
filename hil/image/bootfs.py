"""What goes on a Raspberry Pi OS boot partition, per Compute Module model, as small stand-ins.

The names are the ones each model's firmware looks for, so a virtual module can check an image the way
the real boot chain would (right kernel name, right device tree, config.txt, cmdline.txt). The contents
are stand-ins: a kernel with a valid header, a valid but tiny device tree, and labelled firmware files.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from hil.errors import InputError
from hil.image.mbr import partuuid

FDT_MAGIC = 0xD00DFEED
ARM64_MAGIC = b"ARM\x64"  # at 0x38 of an arm64 Image header
ZIMAGE_MAGIC = 0x016F2818  # at 0x24 of an ARM zImage


@dataclass(frozen=True)
class BootFiles:
    """What a model's firmware loads from the boot partition, and what its device tree says it is."""

    kernel: str
    arm64: bool
    dtb: str
    firmware: tuple[str, ...]
    compatible: tuple[str, ...]
    title: str  # the device tree's model string, as /proc/device-tree/model shows it
    config: tuple[str, ...] = ()  # model-specific config.txt section
    page_kib: int = 4  # kernel page size: the BCM2712 kernel (kernel_2712.img) uses 16 KiB pages


_CM1 = BootFiles("kernel.img", False, "bcm2708-rpi-cm.dtb", ("bootcode.bin", "start.elf", "fixup.dat"),
                 ("raspberrypi,compute-module", "brcm,bcm2835"), "Raspberry Pi Compute Module Rev 1.0")
_CM3 = replace(_CM1, kernel="kernel8.img", arm64=True, dtb="bcm2710-rpi-cm3.dtb",
               compatible=("raspberrypi,3-compute-module", "brcm,bcm2837"),
               title="Raspberry Pi Compute Module 3 Rev 1.0")
_CM4 = replace(_CM3, dtb="bcm2711-rpi-cm4.dtb", firmware=("start4.elf", "fixup4.dat"),
               compatible=("raspberrypi,4-compute-module", "brcm,bcm2711"),
               title="Raspberry Pi Compute Module 4 Rev 1.0", config=("[cm4]", "otg_mode=1"))

BOOT_FILES: dict[str, BootFiles] = {
    "cm1": _CM1,
    "cm3": _CM3,
    "cm3+": replace(_CM3, title="Raspberry Pi Compute Module 3 Plus Rev 1.0"),
    "cm4": _CM4,
    "cm4s": replace(_CM4, dtb="bcm2711-rpi-cm4s.dtb", config=(),
                    compatible=("raspberrypi,4-compute-module-s", "brcm,bcm2711"),
                    title="Raspberry Pi Compute Module 4S Rev 1.0"),
    "cm5": replace(_CM4, kernel="kernel_2712.img", dtb="bcm2712-rpi-cm5-cm5io.dtb", firmware=(),
                   compatible=("raspberrypi,5-compute-module", "brcm,bcm2712"),
                   title="Raspberry Pi Compute Module 5 Rev 1.0",
                   config=("[cm5]", "dtoverlay=dwc2,dr_mode=host"), page_kib=16),
}


def boot_files(model: str) -> BootFiles:
    try:
        return BOOT_FILES[model]
    except KeyError:
        raise InputError(f"unknown model {model!r}; choose one of {', '.join(BOOT_FILES)}",
                         stage="image.build") from None


def config_txt(model: str, *, uart: bool = True, extra: tuple[str, ...] = ()) -> str:
    files = boot_files(model)
    lines = [
        f"# Stand-in Raspberry Pi OS config.txt for a {model}, written by `hil image build`",
        "# https://www.raspberrypi.com/documentation/computers/config_txt.html",
        "dtparam=audio=on",
        "auto_initramfs=1",
        "dtoverlay=vc4-kms-v3d",
        "disable_overscan=1",
        *(["arm_64bit=1"] if files.arm64 else []),
        *(["", *files.config] if files.config else []),
        "",
        "[all]",
        *(["enable_uart=1"] if uart else []),
        *extra,
    ]
    return "\n".join(lines) + "\n"


def cmdline_txt(disk_id: int, extra: tuple[str, ...] = ()) -> str:
    """One line, as the firmware requires: serial and screen consoles, root by PARTUUID."""
    args = ["console=serial0,115200", "console=tty1", f"root=PARTUUID={partuuid(disk_id, 2)}",
            "rootfstype=ext4", "fsck.repair=yes", "rootwait", *extra]
    return " ".join(args) + "\n"


def kernel_standin(model: str, build_id: str) -> bytes:
    """A kernel-shaped file: the header a bootloader checks, then a label instead of code."""
    files = boot_files(model)
    body = f"hil stand-in kernel for {model}, build {build_id}; not a Linux kernel\n".encode()
    if files.arm64:  # Documentation/arch/arm64/booting.rst: 64-byte header, magic at 0x38
        size = 64 + len(body)
        page_bits = {4: 1, 16: 2, 64: 3}[files.page_kib]
        flags = page_bits << 1 | 1 << 3  # little-endian, page size, placeable anywhere
        branch = 0x14000000 | 64 // 4  # "b" over the header
        header = struct.pack("<IIQQQQQQ4sI", branch, 0, 0, size, flags, 0, 0, 0, ARM64_MAGIC, 0)
        return header + body
    # zImage: nine no-op instructions, then magic, start and end address at 0x24..0x2f
    size = 0x30 + len(body)
    return struct.pack("<9IIII", *[0xE1A00000] * 9, ZIMAGE_MAGIC, 0, size) + body


def dtb_standin(model: str) -> bytes:
    """A valid flattened device tree with just a root node naming the board (compatible, model)."""
    files = boot_files(model)
    props = {"compatible": b"".join(c.encode() + b"\0" for c in files.compatible),
             "model": files.title.encode() + b"\0"}
    strings, body = bytearray(), bytearray(struct.pack(">II", 1, 0))  # FDT_BEGIN_NODE, name ""
    for name, value in props.items():
        body += struct.pack(">III", 3, len(value), len(strings)) + _pad4(value)  # FDT_PROP
        strings += name.encode() + b"\0"
    body += struct.pack(">II", 2, 9)  # FDT_END_NODE, FDT_END
    header_size, reserve_map = 40, bytes(16)  # one empty memory reservation entry ends the map
    off_struct = header_size + len(reserve_map)
    off_strings = off_struct + len(body)
    total = off_strings + len(strings)
    header = struct.pack(">10I", FDT_MAGIC, total, off_struct, off_strings, header_size, 17, 16, 0,
                         len(strings), len(body))
    return header + reserve_map + bytes(body) + bytes(strings)


def boot_partition(model: str, *, disk_id: int, build_id: str, uart: bool = True,
                   config: tuple[str, ...] = (), cmdline: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file of the boot partition, by name."""
    files = boot_files(model)
    out = {name: f"hil stand-in for {name} ({model}); not Raspberry Pi firmware\n".encode()
           for name in files.firmware}
    out[files.kernel] = kernel_standin(model, build_id)
    out[files.dtb] = dtb_standin(model)
    out["config.txt"] = config_txt(model, uart=uart, extra=config).encode()
    out["cmdline.txt"] = cmdline_txt(disk_id, cmdline).encode()
    return out


def _pad4(b: bytes) -> bytes:
    return b + bytes(-len(b) % 4)
