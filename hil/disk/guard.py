"""The wrong-disk guard: layered checks before anything writes to a disk, each refusal naming itself.

Names lie (``/dev/sdX`` moves between boots, and inside a umockdev test bed it is a node over a loop
device), so every comparison uses device numbers: the ``st_rdev`` of the node once opened against the ``st_dev`` of
``/`` and ``/boot`` and against every mounted filesystem and swap, each mapped to its whole disk
through ``lsblk`` (run outside any test bed, so it sees the host's real block devices). The disk is
then opened ``O_EXCL``, which the kernel refuses while anything mounts or claims it, and kept open:
the descriptor that passed the checks is the one the writer uses. A loop device over the disk claims
nothing and is no child in lsblk, so loop devices and holders are read from the host's sysfs.

The checks are lists of independent functions (:data:`DISK_CHECKS`, :data:`IN_USE_CHECKS`); add one there.
Those about what uses the disk run again right before the first write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import pyudev

from hil.disk.automount import undo_automounts
from hil.disk.carrier import EMMC_TOLERANCE, identity_problem, size_ok, target_problem
from hil.disk.discovery import Disk, disks_on_port
from hil.errors import InfrastructureError
from hil.hostenv import outside_umockdev
from hil.image.tools import run
from hil.rig import Rig

STAGE = "disk.guard"
SYSTEM_PATHS = ("/", "/boot", "/boot/firmware", "/usr", "/var", "/home")
_BLKGETSIZE64 = 0x80081272


class GuardRefusal(InfrastructureError):
    """A check of the wrong-disk guard failed; ``check`` names it."""

    def __init__(self, check: str, disk: Disk, why: str, fix: str):
        super().__init__(f"refusing to write {disk.describe()}: check '{check}' failed: {why}. Fix: {fix}",
                         stage=STAGE, check=check, device=disk.node)
        self.check = check


@dataclass
class GuardedDisk:
    """A disk that passed every check, open read-write with O_DIRECT and O_EXCL."""

    disk: Disk
    fd: int
    rdev: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuardedDisk:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _devnum(text: str) -> int:
    major, minor = text.split(":")
    return os.makedev(int(major), int(minor))


def _parents() -> dict[int, int]:
    """Block device number -> its parent's (partition -> disk, dm -> its slave), from the real host."""
    proc = run(["lsblk", "--list", "--noheadings", "--output", "NAME,MAJ:MIN,PKNAME"], package="util-linux",
               stage=STAGE)
    by_name: dict[str, int] = {}
    parent_name: dict[int, str] = {}
    for line in proc.stdout.decode().splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        number = _devnum(fields[1])
        by_name[fields[0]] = number
        if len(fields) > 2:
            parent_name[number] = fields[2]
    return {n: by_name[p] for n, p in parent_name.items() if p in by_name}


def _ancestors(number: int, parents: dict[int, int]) -> set[int]:
    out = {number}
    while number in parents and parents[number] not in out:
        number = parents[number]
        out.add(number)
    return out


def _mounted() -> dict[int, str]:
    """Device number -> mount point of every mounted filesystem, and swap devices."""
    out: dict[int, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.setdefault(_devnum(fields[2]), fields[4].replace("\\040", " "))
    try:
        with open("/proc/swaps") as f:
            for line in f.readlines()[1:]:
                path = line.split()[0]
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                out.setdefault(st.st_rdev if st.st_rdev else st.st_dev, f"swap {path}")
    except OSError:
        pass
    return out


@dataclass(frozen=True)
class BlockDevice:
    """One entry of the host's /sys/class/block, as a process outside any test bed sees it."""

    name: str
    number: int
    parent: str | None  # the whole disk of a partition
    holders: tuple[str, ...]  # device-mapper, md, bcache... stacked on it
    backing: int | None = None  # a loop device's backing block device (None: a file, or not a loop)
    backing_file: str | None = None
    offset: int = 0
    autoclear: bool = False  # detached once its last user closes it (``mount -o loop``, or a lazy losetup -d)


# Run outside umockdev: it redirects /sys, and a loop device or holder is the host's business.
_SYSFS_SCAN = r"""
import glob, json, os, stat
out = []
for d in sorted(glob.glob("/sys/class/block/*")):
    def rd(p):
        try:
            with open(os.path.join(d, p)) as f:
                return f.read().strip()
        except OSError:
            return None
    try:
        holders = sorted(os.listdir(os.path.join(d, "holders")))
    except OSError:
        holders = []
    real = os.path.realpath(d)
    item = {"name": os.path.basename(d), "dev": rd("dev"), "holders": holders,
            "parent": os.path.basename(os.path.dirname(real)) if os.path.exists(os.path.join(d, "partition")) else None}
    back = rd("loop/backing_file")
    if back:
        item["backing_file"] = back
        item["offset"] = int(rd("loop/offset") or 0)
        item["autoclear"] = rd("loop/autoclear") == "1"
        try:
            st = os.stat(back)
            if stat.S_ISBLK(st.st_mode):
                item["backing"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        except OSError:
            pass
    out.append(item)
print(json.dumps(out))
"""


def host_block_devices() -> list[BlockDevice]:
    """Every block device of the host with its holders and, for loop devices, what backs them."""
    proc = subprocess.run([sys.executable, "-c", _SYSFS_SCAN], capture_output=True, env=outside_umockdev(),
                          stdin=subprocess.DEVNULL, timeout=30, check=False)
    if proc.returncode:
        raise InfrastructureError(f"cannot list the host's block devices: {proc.stderr.decode(errors='replace')}",
                                  stage=STAGE)
    out = []
    for item in json.loads(proc.stdout):
        if not item.get("dev"):
            continue
        backing = item.get("backing")
        out.append(BlockDevice(item["name"], _devnum(item["dev"]), item.get("parent"), tuple(item["holders"]),
                               os.makedev(*backing) if backing else None, item.get("backing_file"),
                               item.get("offset", 0), item.get("autoclear", False)))
    return out


@dataclass
class HostView:
    """What one run of the checks knows about the host; collected once per run."""

    rdev: int  # the disk's device number, from the descriptor that will write
    parents: dict[int, int] = field(default_factory=dict)
    mounted: dict[int, str] = field(default_factory=dict)
    block: list[BlockDevice] = field(default_factory=list)

    @classmethod
    def collect(cls, rdev: int) -> HostView:
        return cls(rdev, _parents(), _mounted(), host_block_devices())

    def ours(self) -> list[BlockDevice]:
        """The disk and its partitions."""
        disk = next((b for b in self.block if b.number == self.rdev), None)
        if disk is None:
            return []
        return [disk, *(b for b in self.block if b.parent == disk.name)]


#: A check looks at the disk (and the host) and raises GuardRefusal; independent of the others.
Check = Callable[[Disk, Rig, HostView], None]


def check_port(disk: Disk, rig: Rig, view: HostView) -> None:
    if disk.port != rig.usb_port:
        raise GuardRefusal("usb port", disk, f"it hangs off USB port {disk.port}, not the rig's port {rig.usb_port}",
                           f"only flash the disk on {rig.usb_port}; correct [usb] port in {rig.path} if the "
                           "module moved")


def check_transport(disk: Disk, rig: Rig, view: HostView) -> None:
    if disk.bus != "usb":
        raise GuardRefusal("usb transport", disk, f"its transport is {disk.bus!r}, not usb",
                           "a Compute Module in mass-storage mode is a USB disk; check the rig's port")


def check_identity(disk: Disk, rig: Rig, view: HostView) -> None:
    problem = identity_problem(disk)
    if problem:
        raise GuardRefusal("usb identity", disk, problem, "flash only the module's own disk; a USB stick, card reader "
                           f"or another device on port {disk.port} never is one")


def check_target(disk: Disk, rig: Rig, view: HostView) -> None:
    problem = target_problem(disk, rig)
    if problem:
        other = "nvme" if rig.usb_boot.disk == "emmc" else "emmc"
        raise GuardRefusal("which disk", disk, problem, f'set [usb] disk = "{other}" in {rig.path} to write this '
                           "one instead")


def check_size(disk: Disk, rig: Rig, view: HostView) -> None:
    if rig.usb_boot.disk == "emmc" and not size_ok(rig, disk.size):
        window = ("exactly" if rig.is_virtual else f"up to {EMMC_TOLERANCE:.0%} below")
        raise GuardRefusal("size", disk, f"{disk.size} bytes is not the rig's eMMC ({window} {rig.emmc_size} bytes)",
                           f"this is not the module's eMMC, or [emmc] size in {rig.path} is not the one on the module")


def check_system_disk(disk: Disk, rig: Rig, view: HostView) -> None:
    for path in SYSTEM_PATHS:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        if view.rdev in _ancestors(dev, view.parents):
            raise GuardRefusal("system disk", disk, f"it holds {path} of this host",
                               "never flash the host's own disk; check the rig's USB port")


def check_mounted(disk: Disk, rig: Rig, view: HostView) -> None:
    for dev, where in view.mounted.items():
        if view.rdev in _ancestors(dev, view.parents):
            raise GuardRefusal("mounted", disk, f"it (or a partition of it) is mounted or in use at {where}",
                               f"unmount {where} first (umount), then flash again")


def check_loop_backed(disk: Disk, rig: Rig, view: HostView) -> None:
    """A loop device over the disk (``mount -o loop,offset=...``, ``losetup``) neither shows as its child
    in lsblk nor holds it exclusively, yet whatever it carries would be written under."""
    ours = {b.number: b.name for b in view.ours()}
    for loop in view.block:
        if loop.backing in ours:
            where = view.mounted.get(loop.number)
            use = f", mounted at {where}" if where else ""
            raise GuardRefusal("loop device", disk, f"/dev/{loop.name} is a loop device over /dev/"
                               f"{ours[loop.backing]} (bytes from {loop.offset}){use}",
                               (f"umount {where}, then " if where else "") + f"losetup -d /dev/{loop.name}")


def check_holders(disk: Disk, rig: Rig, view: HostView) -> None:
    for dev in view.ours():
        if dev.holders:
            names = ", ".join(f"/dev/{h}" for h in dev.holders)
            raise GuardRefusal("holders", disk, f"/dev/{dev.name} is held by {names} (device-mapper, LVM, RAID)",
                               "release them (dmsetup remove, vgchange -an, mdadm --stop), then flash again")


#: Checks of the disk's own description (port, transport, size): cheap, run first. Add a check here or below.
DISK_CHECKS: list[Check] = [check_port, check_transport, check_identity, check_target, check_size]
#: Checks of what the host does with the disk: run before it is opened, and again right before the first
#: write on the held descriptor (anything may start using a disk meanwhile).
IN_USE_CHECKS: list[Check] = [check_system_disk, check_mounted, check_loop_backed, check_holders]


def _after_unmount(view: HostView, wait: float = 2.0) -> HostView:
    """The host once the automounts are gone: a loop device that carried one is detached by the kernel only when
    its last user (a udev probe, say) closes it, so give such unmounted, auto-clearing loops a moment to go."""
    deadline = time.monotonic() + wait
    while True:
        view = HostView.collect(view.rdev)
        ours = {b.number for b in view.ours()}
        going = [b for b in view.block if b.backing in ours and b.autoclear and b.number not in view.mounted]
        if not going or time.monotonic() >= deadline:
            return view
        time.sleep(0.1)


def guard_disk(disk: Disk, rig: Rig) -> GuardedDisk:
    """Run every check and open the disk; raises :class:`GuardRefusal` naming the failed check."""
    for check in DISK_CHECKS:
        check(disk, rig, HostView(0))
    view = HostView.collect(_device_number(disk))
    check_system_disk(disk, rig, view)  # before anything is unmounted
    if undo_automounts(view.rdev):  # a desktop's automount of our own disk, through udisks; never another disk's
        view = _after_unmount(view)
    for check in IN_USE_CHECKS:
        check(disk, rig, view)
    try:
        fd = os.open(disk.node, os.O_RDWR | os.O_EXCL | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise GuardRefusal("exclusive open", disk, "the kernel reports it busy (mounted, swap, RAID/LVM "
                               "member or opened exclusively by another program)",
                               "stop whatever uses it (lsof, fuser -m), then flash again") from None
        raise GuardRefusal("exclusive open", disk, f"it cannot be opened for writing ({e.strerror})",
                           "run as root or give the rig's user write access to the disk") from None
    guarded = GuardedDisk(disk, fd, view.rdev)
    try:
        check_still_same(guarded, rig)
    except BaseException:
        guarded.close()
        raise
    return guarded


def _device_number(disk: Disk, check: str = "block device") -> int:
    """The device number the node really opens: fstat of an open descriptor, because umockdev's stat() of
    a test bed node reports the sysfs numbers instead. A node we may not open is judged by stat()."""
    try:
        fd = os.open(disk.node, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EACCES):
            raise GuardRefusal(check, disk, f"{disk.node} cannot be opened ({e.strerror})",
                               "check the USB cable and the module's power, then flash again") from None
        st = os.stat(disk.node)
    else:
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    if not stat.S_ISBLK(st.st_mode):
        raise GuardRefusal(check, disk, f"{disk.node} is not a block device", "check the device")
    return st.st_rdev


def device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("<Q", buf)[0])


def check_still_same(guarded: GuardedDisk, rig: Rig, context: pyudev.Context | None = None) -> None:
    """Just before writing: the same device (number), on the same port, with the same size, and still used by
    nothing else (:data:`IN_USE_CHECKS`, judged by the held descriptor's device number)."""
    disk = guarded.disk
    now = [d for d in disks_on_port(rig.usb_port, context) if d.node == disk.node]
    try:
        opened = os.fstat(guarded.fd).st_rdev
        size = device_size(guarded.fd)
    except OSError as e:
        raise GuardRefusal("same device", disk, f"it went away ({e.strerror})",
                           "check the USB cable and the module's power, then flash again") from None
    if not now:
        raise GuardRefusal("same device", disk, f"it is no longer on USB port {rig.usb_port}",
                           "check the USB cable and the module's power, then flash again")
    rdev = _device_number(disk, "same device")
    if rdev != guarded.rdev or opened != guarded.rdev:
        raise GuardRefusal("same device", disk, f"{disk.node} now names another device",
                           "a disk was replugged; run the flash again")
    if now[0].size != disk.size or size != disk.size:
        raise GuardRefusal("same device", disk, f"its size changed to {size} bytes",
                           "a disk was replugged; run the flash again")
    view = HostView.collect(opened)
    for check in IN_USE_CHECKS:
        check(disk, rig, view)

