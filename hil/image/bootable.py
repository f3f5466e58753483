"""A *bootable* CM3 test image: Debian's arm64 kernel and busybox on the Raspberry Pi OS layout of :mod:`build`.

The virtual CM3 under QEMU (``hil.virtual.qemu``) boots it with a real kernel, so a test proves that the bytes
the framework wrote are a bootable system, and which one: the root filesystem prints ``/etc/build-id`` at
boot and a root login reads it back. The pieces come from two Debian packages that
``scripts/fetch-guest.sh`` downloads at setup time (nothing is committed); they are unpacked once into a
*guest kit* in the same cache, keyed by the packages and by what this module puts in the initramfs.

What Debian's generic kernel needs on a CM3 (virtual-rig-substrate.md part 2, section 4): the eMMC host
(``bcm2835`` sdhost), its supply regulator and the file systems are modules, so the initramfs loads them in
dependency order (``modules.dep`` is made at install time, which never happens here) before it looks for
``root=``. Its own messages and the root filesystem's go to ``/dev/kmsg``: Raspberry Pi OS's cmdline puts
``console=tty1`` last, so ``/dev/console`` is the screen, and the kernel log is what reaches the UART.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from hil.errors import InputError
from hil.image.bootfs import boot_files
from hil.image.build import BuiltImage, ImageSpec, build_image
from hil.image.debkit import cached_kit, extract, kernel_release, one_package, pack_initramfs

STAGE = "image.bootable"
MODELS = ("cm3", "cm3+")
CACHE_ENV = "HIL_GUEST_CACHE"
#: The guest's printk line that names the running build (a rig's ``build_id`` boot marker matches it).
BUILD_ID_LINE = "hil: build-id {build_id} booted from {root}"
DEBIAN_DTB = "bcm2837-rpi-cm3-io3.dtb"  # Debian's name for the CM3 on its IO board; the Pi firmware's differs
INITRAMFS = "initramfs8"  # what config.txt's auto_initramfs=1 pairs with kernel8.img

#: Kernel modules, in the order they must be loaded (``modinfo -F depends``), by path under kernel/.
MODULES = (
    "drivers/regulator/fixed",  # the CM3 device tree's vmmc-supply: without it the eMMC probe defers forever
    "drivers/mmc/host/sdhci", "drivers/mmc/host/sdhci-pltfm", "drivers/mmc/host/sdhci-iproc",
    "drivers/mmc/host/bcm2835",  # sdhost: the CM3's eMMC
    "fs/fat/fat", "fs/fat/vfat", "fs/nls/nls_cp437", "fs/nls/nls_iso8859-1",
    "fs/nls/nls_ascii",  # CONFIG_FAT_DEFAULT_IOCHARSET="ascii": vfat mounts fail without it
    "lib/crc16", "fs/mbcache", "fs/jbd2/jbd2", "crypto/crc32c_generic", "fs/ext4/ext4",
    "drivers/watchdog/bcm2835_wdt",  # makes the guest's reboot and poweroff reach QEMU
)

#: Busybox applets linked into the root filesystem (from Debian's busybox-static configuration).
APPLETS = {
    "bin": ("ash", "awk", "basename", "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df", "dirname", "dmesg",
            "du", "echo", "egrep", "env", "expr", "false", "find", "free", "grep", "gunzip", "gzip", "head",
            "hexdump", "hostname", "id", "kill", "less", "ln", "login", "ls", "md5sum", "mkdir", "more", "mount",
            "mv", "nproc", "od", "printf", "ps", "pwd", "readlink", "rm", "rmdir", "sed", "seq", "sh",
            "sha256sum", "sleep", "sort", "stat", "stty", "sync", "tail", "tee", "test", "touch", "tr", "true",
            "umount", "uname", "uniq", "uptime", "vi", "wc", "which", "xargs"),
    "sbin": ("fdisk", "getty", "halt", "init", "insmod", "lsmod", "mdev", "poweroff", "reboot"),
}

_INIT = r"""#!/bin/sh
# The hil test image's initramfs: load what Debian's kernel builds as modules, find root=, switch to it.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "hil-initramfs: $*" >/dev/kmsg; }
say "kernel $(uname -r) on $(tr -d '\0' </proc/device-tree/model)"
for m in @MODULES@; do insmod "/lib/modules/$m.ko" || say "insmod $m failed"; done
root= fstype=ext4 wait=5
for arg in $(cat /proc/cmdline); do
  case $arg in
    root=*) root=${arg#root=} ;;
    rootfstype=*) fstype=${arg#rootfstype=} ;;
    rootwait) wait=forever ;;
  esac
done
resolve() {  # root= as the kernel takes it: /dev/NAME, or PARTUUID=<MBR disk id>-<partition number>
  case $root in
    /dev/*) echo "$root" ;;
    PARTUUID=*)
      id=${root#PARTUUID=} part=${root##*-}
      for disk in /sys/block/mmcblk*; do
        disk=${disk##*/}
        mbr_id=$(od -An -tx4 -j440 -N4 "/dev/$disk" 2>/dev/null | tr -d ' ')
        [ "$mbr_id" = "${id%-*}" ] && echo "/dev/${disk}p${part#0}"
      done ;;
  esac
}
tries=0
until dev=$(resolve) && [ -b "$dev" ]; do
  tries=$((tries + 1))
  [ $tries = 10 ] && say "Waiting for root device $root..."
  if [ $wait != forever ] && [ $tries -ge $((wait * 10)) ]; then
    say "VFS: Cannot open root device \"$root\""; exit 1
  fi
  sleep 0.1
done
mkdir -p /newroot
mount -t "$fstype" -o rw "$dev" /newroot || { say "cannot mount $dev as $fstype"; exit 1; }
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot /sbin/init
"""

_RCS = r"""#!/bin/sh
# The hil test image's only boot script: mounts, hostname, and the line that names this build.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname
root=$(awk '$2 == "/" { dev = $1 } END { print dev }' /proc/mounts)
echo "@LINE@" >/dev/kmsg
"""

_INITTAB = """::sysinit:/etc/init.d/rcS
ttyAMA0::respawn:/sbin/getty -L 115200 ttyAMA0 vt100
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
"""


@dataclass(frozen=True)
class GuestKit:
    """The unpacked guest pieces, named as they go on the boot partition (plus the busybox binary)."""

    path: Path
    kernel_release: str

    @property
    def boot(self) -> dict[str, Path]:
        files = boot_files("cm3")
        return {files.kernel: self.path / files.kernel, files.dtb: self.path / files.dtb,
                INITRAMFS: self.path / INITRAMFS}

    @property
    def busybox(self) -> Path:
        return self.path / "busybox"


def guest_cache() -> Path:
    """Where scripts/fetch-guest.sh keeps the packages: $HIL_GUEST_CACHE, else .cache/guest in the repo."""
    return Path(os.environ.get(CACHE_ENV) or Path(__file__).resolve().parents[2] / ".cache" / "guest")


def guest_kit(cache: Path | None = None) -> GuestKit:
    """The guest kit from the cached packages, unpacked on first use (a few seconds) and reused after."""
    cache = cache or guest_cache()
    kernel_deb = one_package(cache, "linux-image-*-arm64_*_arm64.deb", STAGE)
    busybox_deb = one_package(cache, "busybox-static_*_arm64.deb", STAGE)
    release = kernel_release(kernel_deb)
    key = hashlib.sha256("\n".join([kernel_deb.name, busybox_deb.name, _INIT, *MODULES]).encode()).hexdigest()[:16]
    path = cached_kit(cache, "kit-", key, lambda staging: _unpack(kernel_deb, busybox_deb, release, staging),
                      f"{kernel_deb.name}\n{busybox_deb.name}\n")
    return GuestKit(path, release)


def build_bootable(out: Path, spec: ImageSpec, kit: GuestKit | None = None) -> BuiltImage:
    """A test image (``spec`` as for :func:`build_image`) that a virtual CM3 boots under QEMU to a root login.

    Its kernel talks from its first line (``earlycon``), not only once the UART driver is up seconds later, so
    a kernel that never starts is told apart from a slow one early."""
    if spec.model not in MODELS:
        raise InputError(f"a bootable image is made for {' or '.join(MODELS)} (what QEMU's raspi3b machine runs), "
                         f"not {spec.model}", stage=STAGE)
    kit = kit or guest_kit()
    if "earlycon" not in spec.cmdline:
        spec = replace(spec, cmdline=("earlycon", *spec.cmdline))

    def add_root(root: Path) -> None:
        _root_tree(root, kit)

    return build_image(out, spec, extra_boot=kit.boot, extra_root=add_root)


def _unpack(kernel_deb: Path, busybox_deb: Path, release: str, kit: Path) -> None:
    files = boot_files("cm3")
    wanted = {f"./boot/vmlinuz-{release}": kit / files.kernel,  # an uncompressed arm64 Image
              f"./usr/lib/linux-image-{release}/broadcom/{DEBIAN_DTB}": kit / files.dtb}
    initramfs = kit / "initramfs"
    modules = initramfs / "lib" / "modules"
    for module in MODULES:
        wanted[f"./lib/modules/{release}/kernel/{module}.ko"] = modules / f"{Path(module).name}.ko"
    extract(kernel_deb, wanted, STAGE)
    extract(busybox_deb, {"./bin/busybox": kit / "busybox"}, STAGE)
    (initramfs / "bin").mkdir(parents=True)
    shutil.copy2(kit / "busybox", initramfs / "bin" / "busybox")
    (initramfs / "bin" / "sh").symlink_to("busybox")
    for folder in ("dev", "proc", "sys", "newroot"):
        (initramfs / folder).mkdir()
    names = " ".join(Path(m).name for m in MODULES)
    (initramfs / "init").write_text(_INIT.replace("@MODULES@", names))
    (initramfs / "init").chmod(0o755)
    (kit / INITRAMFS).write_bytes(pack_initramfs(initramfs, STAGE))
    shutil.rmtree(initramfs)


def _root_tree(root: Path, kit: GuestKit) -> None:
    """Busybox as init, getty and shell; inittab with a getty on the CM3's UART; the build-id line at boot."""
    for folder in ("bin", "sbin", "dev", "proc", "sys", "etc/init.d"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy2(kit.busybox, root / "bin" / "busybox")
    for folder, applets in APPLETS.items():
        for applet in applets:
            (root / folder / applet).symlink_to("busybox" if folder == "bin" else "../bin/busybox")
    (root / "etc/inittab").write_text(_INITTAB)
    line = BUILD_ID_LINE.format(build_id="$(cat /etc/build-id)", root="$root")
    (root / "etc/init.d/rcS").write_text(_RCS.replace("@LINE@", line))
    (root / "etc/init.d/rcS").chmod(0o755)
