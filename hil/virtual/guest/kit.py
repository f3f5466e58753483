"""The kernel-transport guest's kit: Debian's amd64 kernel and the modules the guest loads, busybox, and an
initramfs whose ``/init`` mounts the host's root read-only over 9p and runs one job in it.

The kernel package ships no ``modules.dep`` (depmod runs at install time, which never happens here), so the load
order comes from each module's own ``depends=`` field, read out of its ``.modinfo`` bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hil.image.bootable import guest_cache
from hil.image.debkit import cached_kit, extract, members, one_package, pack_initramfs

STAGE = "virtual.guest"
ARCH = "amd64"

#: What the guest loads, by module name; their dependencies are added in load order.
MODULES = (
    "virtio_pci", "9pnet_virtio", "9p",  # the host's root and the shared folders
    "dummy_hcd", "gadgetfs", "usb_f_mass_storage",  # the virtual module's side of the bus
    "usbmon", "usb_storage", "sd_mod",  # the host's side: traces, and the disk as hardware makes it
    "loop", "fuse",  # the virtual eMMC: a FUSE speed model under a loop device, as on the umockdev transport
)
#: Loaded only once the job says how many buses it needs and at which speed (module parameters).
LATE = ("dummy_hcd",)

INIT = r"""#!/bin/busybox sh
# The kernel-transport guest: mount the host's root read-only, share the job's folders, load the USB stack,
# trace the bus with usbmon, run the job in the host's root, hand back its exit code, power off.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
say() { $B echo "hil-guest: $*" >/dev/console; }
for m in $($B cat /modules); do
  case " @LATE@ " in *" $m "*) continue ;; esac
  $B insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done
R=/newroot X=/newroot/run/hil-guest
opts=trans=virtio,version=9p2000.L,msize=1048576
$B mount -t 9p -o "$opts,ro,cache=loose" hostroot $R || { say "cannot mount the host's root"; $B poweroff -f; }
$B mount -t tmpfs -o mode=1777 tmp $R/tmp
$B mount -t tmpfs -o mode=755 run $R/run
$B mkdir -p $X
$B mount -t 9p -o "$opts" hilx $X || { say "cannot mount the job folder"; $B poweroff -f; }
while read -r tag path; do
  [ -d "$R$path" ] || $B mkdir -p "$R$path"  # under the guest's own /tmp or /run
  $B mount -t 9p -o "$opts" "$tag" "$R$path" || say "cannot share $path"
done <$X/shares
$B mount --move /dev $R/dev
$B mkdir -p $R/dev/pts $R/dev/shm $R/dev/gadget
$B mount -t devpts -o ptmxmode=666 devpts $R/dev/pts
$B mount -t tmpfs shm $R/dev/shm
$B mount --move /proc $R/proc
$B mount --move /sys $R/sys
$B mount -t debugfs debugfs $R/sys/kernel/debug
$B mount -t configfs configfs $R/sys/kernel/config
$B insmod /lib/modules/dummy_hcd.ko $($B cat $X/dummy_hcd)
$B mount -t gadgetfs gadgetfs $R/dev/gadget
$B mkdir -p $R/run/hil-bin
$B cp $B $R/run/hil-bin/busybox
$B cat >$R/run/hil-bin/stage2 <<'STAGE2'
# After switch_root: the host's root is / and PID 1's root, so udev and friends run as on a host.
B=/run/hil-bin/busybox X=/run/hil-guest
$B cat /sys/kernel/debug/usb/usbmon/0u >$X/usbmon.txt &
mon=$!
$B stty -F /dev/console -onlcr 2>/dev/null
/bin/sh $X/job </dev/null
$B echo $? >$X/exit.tmp && $B mv $X/exit.tmp $X/exit
$B kill $mon
$B dmesg >$X/dmesg.txt
$B dmesg -n 1
$B sync
$B poweroff -f
STAGE2
exec $B switch_root $R /run/hil-bin/busybox sh /run/hil-bin/stage2
"""


@dataclass(frozen=True)
class KernelKit:
    path: Path
    kernel_release: str

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.gz"


def kernel_kit(cache: Path | None = None) -> KernelKit:
    """The kit from the cached amd64 packages, made on first use (a few seconds) and reused after."""
    cache = cache or guest_cache()
    kernel_deb = one_package(cache, f"linux-image-*-{ARCH}_*_{ARCH}.deb", STAGE)
    busybox_deb = one_package(cache, f"busybox-static_*_{ARCH}.deb", STAGE)
    release = kernel_deb.name.removeprefix("linux-image-").split("_", 1)[0]
    key = hashlib.sha256("\n".join([kernel_deb.name, busybox_deb.name, INIT, *MODULES]).encode()).hexdigest()[:16]
    path = cached_kit(cache, f"{ARCH}-kit-", key, lambda staging: _build(kernel_deb, busybox_deb, release, staging),
                      f"{kernel_deb.name}\n{busybox_deb.name}\n")
    return KernelKit(path, release)


def load_order(depends: dict[str, tuple[str, ...]], wanted: tuple[str, ...]) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"module dependency loop: {' -> '.join((*path, name))}")
        if name not in depends:
            raise KeyError(name)
        for dep in depends[name]:
            visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def module_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".ko").replace("-", "_")


_DEPENDS = re.compile(rb"(?:^|\0)depends=([A-Za-z0-9_,-]*)\0")


def _build(kernel_deb: Path, busybox_deb: Path, release: str, kit: Path) -> None:
    prefix = f"./lib/modules/{release}/kernel/"
    depends: dict[str, tuple[str, ...]] = {}
    paths: dict[str, str] = {}
    for member, tar in members(kernel_deb, STAGE):  # one pass: every module's dependencies
        if member.name.startswith(prefix) and member.name.endswith(".ko"):
            source = tar.extractfile(member)
            assert source is not None
            found = _DEPENDS.search(source.read())
            name = module_name(member.name)
            paths[name] = member.name
            depends[name] = tuple(d.replace("-", "_") for d in found.group(1).decode().split(",") if d) if found \
                else ()
    order = load_order(depends, MODULES)
    initramfs = kit / "initramfs"
    extract(kernel_deb, {f"./boot/vmlinuz-{release}": kit / "vmlinuz",
                         **{paths[m]: initramfs / "lib" / "modules" / f"{m}.ko" for m in order}}, STAGE)
    extract(busybox_deb, {"./bin/busybox": initramfs / "bin" / "busybox"}, STAGE)
    for folder in ("dev", "proc", "sys", "newroot"):
        (initramfs / folder).mkdir()
    (initramfs / "modules").write_text(" ".join(order) + "\n")
    (initramfs / "init").write_text(INIT.replace("@LATE@", " ".join(LATE)))
    (initramfs / "init").chmod(0o755)
    (kit / "initramfs.gz").write_bytes(pack_initramfs(initramfs, STAGE))
    shutil.rmtree(initramfs)
