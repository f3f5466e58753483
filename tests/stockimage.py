"""An image shaped like stock Raspberry Pi OS Lite, made with the system's tools and not with the project's builder.

What matters is what stock images have and the project's own test images do not: ``quiet`` and the firstboot
``init=`` in cmdline.txt, no ``enable_uart`` in config.txt, a locked root (``root:*:`` in /etc/shadow) and no
default user, no /etc/build-id, identity in /etc/os-release and issue.txt on the boot partition, ``root=`` by
PARTUUID. Partitioned with sfdisk, the boot partition made with mkfs.vfat and filled with mtools, the root with
``mkfs.ext4 -d``; the kernel and device tree are stand-ins with valid headers (``hil.image.bootfs``), as no
firmware runs them here. Small (96 MiB, sparse), built in well under a second.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from hil.image.bootfs import boot_files, dtb_standin, kernel_standin

MIB = 1024**2
BOOT_START, BOOT_SIZE, SIZE = 4 * MIB, 40 * MIB, 96 * MIB
PRETTY_NAME = "Debian GNU/Linux 12 (bookworm)"
VERSION_ID = "12"
#: Trixie (Debian 13) images configure their first boot with cloud-init: these files sit on the boot partition.
TRIXIE_PRETTY_NAME = "Debian GNU/Linux 13 (trixie)"
CLOUD_INIT = {"user-data": "#cloud-config\n", "meta-data": "instance-id: rpios-image\n",
              "network-config": "version: 2\n"}
ISSUE_TXT = "Raspberry Pi reference 2024-11-19\nGenerated using pi-gen, https://github.com/RPi-Distro/pi-gen, " \
            "891df1e21ed2b6099a2e6a13e26c91dea44b34d4, stage2\n"


@dataclass(frozen=True)
class StockImage:
    path: Path
    disk_id: int
    model: str

    @property
    def root_partuuid(self) -> str:
        return f"{self.disk_id:08x}-02"


def config_txt(model: str) -> str:
    """Like stock: no enable_uart; the model sections stock images carry."""
    return ("# For more options and information see\n# http://rptl.io/configtxt\n\ndtparam=audio=on\n"
            "camera_auto_detect=1\ndisplay_auto_detect=1\nauto_initramfs=1\ndtoverlay=vc4-kms-v3d\n"
            "max_framebuffers=2\ndisable_fw_kms_setup=1\n"
            + ("arm_64bit=1\n" if boot_files(model).arm64 else "")
            + "disable_overscan=1\narm_boost=1\n\n[cm4]\notg_mode=1\n\n[cm5]\ndtoverlay=dwc2,dr_mode=host\n\n[all]\n")


def cmdline_txt(disk_id: int) -> str:
    return (f"console=serial0,115200 console=tty1 root=PARTUUID={disk_id:08x}-02 rootfstype=ext4 fsck.repair=yes "
            "rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot\n")


def build_stock_image(out: Path, model: str, *, disk_id: int = 0x5E3DA4A7, trixie: bool = False) -> StockImage:
    work = out.with_name(out.name + ".d")
    boot, root = work / "boot", work / "root"
    for d in (boot, root / "etc", root / "home", root / "root"):
        d.mkdir(parents=True, exist_ok=True)
    files = boot_files(model)
    for name in files.firmware:
        (boot / name).write_bytes(f"stand-in {name}\n".encode())
    (boot / files.kernel).write_bytes(kernel_standin(model, "stock"))
    (boot / files.dtb).write_bytes(dtb_standin(model))
    (boot / "config.txt").write_text(config_txt(model))
    (boot / "cmdline.txt").write_text(cmdline_txt(disk_id))
    (boot / "issue.txt").write_text(ISSUE_TXT)
    for name, text in CLOUD_INIT.items() if trixie else ():
        (boot / name).write_text(text)
    etc = root / "etc"
    pretty, version, codename = (TRIXIE_PRETTY_NAME, "13", "trixie") if trixie else (PRETTY_NAME, VERSION_ID,
                                                                                     "bookworm")
    (etc / "os-release").write_text(f'PRETTY_NAME="{pretty}"\nNAME="Debian GNU/Linux"\nVERSION_ID="{version}"'
                                     f'\nVERSION="{version} ({codename})"\nVERSION_CODENAME={codename}\nID=debian\n')
    (etc / "hostname").write_text("raspberrypi\n")
    (etc / "issue").write_text("Debian GNU/Linux 12 \\n \\l\n\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "shadow").write_text("root:*:20046:0:99999:7:::\n")
    (etc / "group").write_text("root:x:0:\nsudo:x:27:\n")
    (etc / "rpi-issue").write_text(ISSUE_TXT)

    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(SIZE)
    table = (f"label: dos\nlabel-id: 0x{disk_id:08x}\n"
             f"start={BOOT_START // 512}, size={BOOT_SIZE // 512}, type=c\n"
             f"start={(BOOT_START + BOOT_SIZE) // 512}, type=83\n")
    _run(["sfdisk", "--quiet", str(out)], table)
    _run(["mkfs.vfat", "-F", "32", "-n", "bootfs", "-S", "512", "-s", "1", "--offset", str(BOOT_START // 512),
          str(out), str(BOOT_SIZE // 1024)])
    drive = f"{out}@@{BOOT_START}"
    _run(["mcopy", "-s", "-i", drive, *(str(p) for p in sorted(boot.iterdir())), "::/"])
    root_start = BOOT_START + BOOT_SIZE
    _run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(root), "-E", f"offset={root_start}", str(out),
          f"{(SIZE - root_start) // 1024}k"])
    return StockImage(out, disk_id, model)


def _run(argv: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
