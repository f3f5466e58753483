"""The wrong-disk guard: layered checks before anything writes to a disk, each refusal naming itself.

Names lie (``/dev/sdX`` moves between boots, and inside a umockdev test bed it is a node over a loop
device), so every comparison uses device numbers: the ``st_rdev`` of the node once opened against the ``st_dev`` of
``/`` and ``/boot`` and against every mounted filesystem and swap, each mapped to its whole disk
through ``lsblk`` (run outside any test bed, so it sees the host's real block devices). The disk is
then opened ``O_EXCL``, which the kernel refuses while anything mounts or claims it, and kept open:
the descriptor that passed the checks is the one the writer uses.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from types import TracebackType

import pyudev

from hil.disk.automount import undo_automounts
from hil.disk.carrier import EMMC_TOLERANCE, identity_problem, size_ok, target_problem
from hil.disk.discovery import Disk, disks_on_port
from hil.errors import InfrastructureError
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


def guard_disk(disk: Disk, rig: Rig) -> GuardedDisk:
    """Run every check and open the disk; raises :class:`GuardRefusal` naming the failed check."""
    if disk.port != rig.usb_port:
        raise GuardRefusal("usb port", disk, f"it hangs off USB port {disk.port}, not the rig's port {rig.usb_port}",
                           f"only flash the disk on {rig.usb_port}; correct [usb] port in {rig.path} if the "
                           "module moved")
    if disk.bus != "usb":
        raise GuardRefusal("usb transport", disk, f"its transport is {disk.bus!r}, not usb",
                           "a Compute Module in mass-storage mode is a USB disk; check the rig's port")
    problem = identity_problem(disk)
    if problem:
        raise GuardRefusal("usb identity", disk, problem, "flash only the module's own disk; a USB stick, card reader "
                           f"or another device on port {disk.port} never is one")
    problem = target_problem(disk, rig)
    if problem:
        other = "nvme" if rig.usb_boot.disk == "emmc" else "emmc"
        raise GuardRefusal("which disk", disk, problem, f'set [usb] disk = "{other}" in {rig.path} to write this '
                           "one instead")
    if rig.usb_boot.disk == "emmc" and not size_ok(rig, disk.size):
        window = ("exactly" if rig.is_virtual else f"up to {EMMC_TOLERANCE:.0%} below")
        raise GuardRefusal("size", disk, f"{disk.size} bytes is not the rig's eMMC ({window} {rig.emmc_size} bytes)",
                           f"this is not the module's eMMC, or [emmc] size in {rig.path} is not the one on the module")
    rdev = _device_number(disk)
    parents = _parents()
    ours = rdev
    for path in SYSTEM_PATHS:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        if ours in _ancestors(dev, parents):
            raise GuardRefusal("system disk", disk, f"it holds {path} of this host",
                               "never flash the host's own disk; check the rig's USB port")
    undo_automounts(rdev)  # a desktop's automount of our own disk, through udisks; never another disk's
    for dev, where in _mounted().items():
        if ours in _ancestors(dev, parents):
            raise GuardRefusal("mounted", disk, f"it (or a partition of it) is mounted or in use at {where}",
                               f"unmount {where} first (umount), then flash again")
    try:
        fd = os.open(disk.node, os.O_RDWR | os.O_EXCL | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise GuardRefusal("exclusive open", disk, "the kernel reports it busy (mounted, swap, RAID/LVM "
                               "member or opened exclusively by another program)",
                               "stop whatever uses it (lsof, fuser -m), then flash again") from None
        raise GuardRefusal("exclusive open", disk, f"it cannot be opened for writing ({e.strerror})",
                           "run as root or give the rig's user write access to the disk") from None
    guarded = GuardedDisk(disk, fd, rdev)
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
    """Just before writing: the same device (number), on the same port, with the same size."""
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

