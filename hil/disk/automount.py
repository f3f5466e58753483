"""Undoing a desktop's automount of the module's own disk, through udisks, before the guard judges it.

A controller with a desktop session mounts every new USB disk's partitions (udisks2, under /media/USER or
/run/media/USER), so without this every flash would fail the guard as "mounted" (real-hardware-review.md,
"Disk discovery and guard"). Only automounts (under those folders) of the disk about to be written are
unmounted, and only through ``udisksctl`` (which asks udisksd, the daemon that mounted them); a mount of any
other disk, or one a person made elsewhere, is never touched, and without udisks nothing is done: the guard
then judges the mounted disk as before. A partition is a child of the disk in ``lsblk``, or a loop device
over the disk at an offset (what ``mount -o loop,offset=`` and udisks' loop setup make).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

from hil.errors import InfrastructureError
from hil.hostenv import outside_umockdev
from hil.image.tools import run

STAGE = "disk.automount"
UDISKSCTL = "udisksctl"
TIMEOUT = 30.0
AUTOMOUNT_ROOTS = ("/media/", "/run/media/")  # where udisks2 mounts for a desktop session


def _loops_over(rdev: int) -> set[str]:
    """Names of loop devices whose backing file is the block device ``rdev``."""
    proc = run(["losetup", "--json", "--list"], package="util-linux", stage=STAGE, check=False)
    found = set()
    for loop in (json.loads(proc.stdout or "{}").get("loopdevices") or []) if proc.returncode == 0 else []:
        try:
            st = os.stat(loop.get("back-file") or "")
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
            found.add(str(loop["name"]).removeprefix("/dev/"))
    return found


def mounted_partitions(rdev: int) -> dict[str, list[str]]:
    """``/dev/NAME`` -> automount points, for each automounted partition of the whole disk ``rdev``."""
    proc = run(["lsblk", "--json", "--list", "--output", "NAME,MAJ:MIN,PKNAME,MOUNTPOINTS"], package="util-linux",
               stage=STAGE)
    devices = json.loads(proc.stdout)["blockdevices"]
    disk = next((d["name"] for d in devices if d.get("maj:min") == f"{os.major(rdev)}:{os.minor(rdev)}"), None)
    if disk is None:
        return {}
    loops = _loops_over(rdev)
    found = {}
    for d in devices:
        points = [m for m in d.get("mountpoints") or [] if m and m.startswith(AUTOMOUNT_ROOTS)]
        if points and (d.get("pkname") == disk or d["name"] in loops):
            found[f"/dev/{d['name']}"] = points
    return found


def undo_automounts(rdev: int) -> list[str]:
    """Unmount every mounted partition of disk ``rdev`` through udisks; the partitions unmounted."""
    program = shutil.which(UDISKSCTL)
    if program is None:
        return []
    done = []
    for partition, points in mounted_partitions(rdev).items():
        try:
            proc = subprocess.run([program, "unmount", "--block-device", partition, "--no-user-interaction"],
                                  capture_output=True, text=True, timeout=TIMEOUT, env=outside_umockdev(),
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise InfrastructureError(f"udisksctl did not unmount {partition} within {TIMEOUT:g} s", stage=STAGE,
                                      partition=partition) from None
        if proc.returncode:
            raise InfrastructureError(f"udisks could not unmount {partition} ({', '.join(points)}): "
                                      f"{(proc.stderr or proc.stdout).strip()}. Fix: unmount it (umount) and flash "
                                      "again", stage=STAGE, partition=partition)
        done.append(partition)
    return done
