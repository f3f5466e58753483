"""The kernel-transport guest's kit: Debian's amd64 kernel and the modules the guest loads, busybox, and an
initramfs whose ``/init`` mounts the host's root read-only over 9p and runs one job in it.

The kernel package ships no ``modules.dep`` (depmod runs at install time, which never happens here), so the load
order comes from each module's own ``depends=`` field, read out of its ``.modinfo`` bytes.

Debian builds no raw_gadget (``CONFIG_USB_RAW_GADGET`` is not set), so the kit compiles it once, out of tree,
from Debian's kernel source package against the same kernel's headers: two seconds of gcc, with the packages
scripts/fetch-guest.sh downloads. Nothing of the kernel's source is kept beyond the built module.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from hil.errors import InfrastructureError
from hil.image.bootable import guest_cache
from hil.image.debkit import cached_kit, extract, kernel_release, members, one_package, pack_initramfs
from hil.image.tools import errors, run

STAGE = "virtual.guest"
ARCH = "amd64"

#: What the guest loads, by module name; their dependencies are added in load order.
MODULES = (
    "virtio_pci", "9pnet_virtio", "9p",  # the host's root and the shared folders
    "dummy_hcd", "usb_f_mass_storage",  # the virtual module's side of the bus (and raw_gadget, built here)
    "usbmon", "usb_storage", "sd_mod",  # the host's side: traces, and the disk as hardware makes it
    "loop", "fuse",  # the virtual eMMC: a FUSE speed model under a loop device, as on the umockdev transport
)
#: Loaded only once the job says how many buses it needs (a module parameter).
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
$B mkdir -p $R/dev/pts $R/dev/shm
$B mount -t devpts -o ptmxmode=666 devpts $R/dev/pts
$B mount -t tmpfs shm $R/dev/shm
$B mount --move /proc $R/proc
$B mount --move /sys $R/sys
$B mount -t debugfs debugfs $R/sys/kernel/debug
$B mount -t configfs configfs $R/sys/kernel/config
$B insmod /lib/modules/dummy_hcd.ko $($B cat $X/dummy_hcd)
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


@dataclass(frozen=True)
class Packages:
    kernel: Path
    busybox: Path
    headers: tuple[Path, ...]  # linux-headers-RELEASE, its -common and linux-kbuild
    source: Path  # linux-source: raw_gadget.c

    @property
    def release(self) -> str:
        return kernel_release(self.kernel)

    @property
    def names(self) -> list[str]:
        return [p.name for p in (self.kernel, self.busybox, *self.headers, self.source)]


def packages(cache: Path) -> Packages:
    kernel = one_package(cache, f"linux-image-*-{ARCH}_*_{ARCH}.deb", STAGE)
    release = kernel_release(kernel)
    common = release.removesuffix(f"-{ARCH}") + "-common"
    return Packages(kernel, one_package(cache, f"busybox-static_*_{ARCH}.deb", STAGE),
                    (one_package(cache, f"linux-headers-{release}_*_{ARCH}.deb", STAGE),
                     one_package(cache, f"linux-headers-{common}_*_all.deb", STAGE),
                     one_package(cache, f"linux-kbuild-*_{ARCH}.deb", STAGE)),
                    one_package(cache, "linux-source-*_all.deb", STAGE))


def kernel_kit(cache: Path | None = None) -> KernelKit:
    """The kit from the cached amd64 packages, made on first use (about half a minute) and reused after."""
    cache = cache or guest_cache()
    debs = packages(cache)
    key = hashlib.sha256("\n".join([*debs.names, INIT, *MODULES]).encode()).hexdigest()[:16]
    path = cached_kit(cache, f"{ARCH}-kit-", key, lambda staging: _build(debs, staging), "\n".join(debs.names))
    return KernelKit(path, debs.release)


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


def _build(debs: Packages, kit: Path) -> None:
    kernel_deb, busybox_deb, release = debs.kernel, debs.busybox, debs.release
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
    build_raw_gadget(debs, kit / "build", initramfs / "lib" / "modules" / "raw_gadget.ko")
    shutil.rmtree(kit / "build")
    for folder in ("dev", "proc", "sys", "newroot"):
        (initramfs / folder).mkdir()
    (initramfs / "modules").write_text(" ".join([*order, "raw_gadget"]) + "\n")
    (initramfs / "init").write_text(INIT.replace("@LATE@", " ".join(LATE)))
    (initramfs / "init").chmod(0o755)
    (kit / "initramfs.gz").write_bytes(pack_initramfs(initramfs, STAGE))
    shutil.rmtree(initramfs)


RAW_GADGET = ("drivers/usb/gadget/legacy/raw_gadget.c", "include/uapi/linux/usb/raw_gadget.h")


def build_raw_gadget(debs: Packages, build: Path, out: Path) -> None:
    """raw_gadget.ko for ``debs.release``: the headers packages unpacked side by side (their Makefile names the
    -common tree by its installed path, pointed here instead), the two source files, kbuild's external-module
    make."""
    root = build / "root"
    root.mkdir(parents=True)
    for deb in debs.headers:
        _run(["dpkg-deb", "-x", deb, root], "dpkg")
    headers = root / "usr" / "src" / f"linux-headers-{debs.release}"
    makefile = headers / "Makefile"
    makefile.write_text(makefile.read_text().replace("/usr/src/", f"{root}/usr/src/"))
    module = build / "raw_gadget"
    module.mkdir()
    wanted = {name: module / (name if name.endswith(".h") else Path(name).name) for name in RAW_GADGET}
    for member, tar in members(debs.source, STAGE):
        if member.name.endswith(".tar.xz"):
            with tarfile.open(fileobj=tar.extractfile(member), mode="r|xz") as src:
                for inner in src:
                    name = inner.name.split("/", 1)[-1]
                    if name in wanted and inner.isfile():
                        target = wanted.pop(name)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(src.extractfile(inner).read())  # type: ignore[union-attr]
                        if not wanted:
                            break
            break
    if wanted:
        raise InfrastructureError(f"{debs.source.name} lacks {', '.join(wanted)}. Fix: run scripts/fetch-guest.sh "
                                  "--refresh", stage=STAGE)
    (module / "Kbuild").write_text("obj-m := raw_gadget.o\nccflags-y := -I$(src)/include\n")
    _run(["make", "-C", headers, f"M={module}", "modules"], "make")
    shutil.copy2(module / "raw_gadget.ko", out)


def _run(argv: list[str | Path], package: str) -> None:
    proc = run(argv, package=package, check=False, stage=STAGE)
    if proc.returncode:
        raise InfrastructureError(f"{Path(str(argv[0])).name} failed while building raw_gadget: {errors(proc)[-600:]}. "
                                  "Fix: run ./setup.sh (make, gcc-12) and scripts/fetch-guest.sh --refresh",
                                  stage=STAGE)
