"""A desktop session on the virtual rig's host: an automounter that mounts the module's partitions as soon as
its disk appears (what udisks2 does for GNOME, KDE or udiskie, under /run/media/USER), and the ``udisksctl`` that
unmounts them again (the real one asks udisksd over D-Bus; this one runs umount). Switched on by
``[virtual.usb] automount = true``; the framework reaches it only as a host would: a mount, and a program on
PATH. A loop device cannot carry partitions on every kernel, so a partition is mounted through a loop device
over the eMMC's at the partition's offset, as ``mount -o loop,offset=`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from hil.disk.discovery import disks_on_port
from hil.hostenv import outside_umockdev
from hil.usbport import UsbPort
from hil.virtual.journal import Journal

UNMOUNT_LOG = "unmounted.log"
POLL = 0.1  # s between looks at the port


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=outside_umockdev(), stdin=subprocess.DEVNULL,
                          check=False, timeout=30)


class Desktop:
    """Automounts the partitions of ``block_device`` (the eMMC's loop device) whenever a disk appears on ``port``."""

    def __init__(self, port: str, block_device: str, home: Path, journal: Journal, media: Path):
        self.port, self.block_device, self.journal = port, block_device, journal
        self.media = media  # where udisks2 would mount: /run/media/USER/...
        self.bin = home / "bin"
        self.mounted: list[str] = []  # partitions mounted by the automounter and still mounted
        self._changed = threading.Condition()
        self._busy = threading.Lock()
        self._settled = False  # the last automount pass is over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._path = os.environ.get("PATH", "")

    def open(self) -> Desktop:
        self._remove_leftovers()
        for folder in (self.media, self.bin):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        program = self.bin / "udisksctl"
        program.write_text(f"#!{sys.executable}\nimport sys\nfrom hil.virtual.desktop import udisksctl\n"
                           "sys.exit(udisksctl(sys.argv[1:]))\n")
        program.chmod(0o700)
        os.environ["PATH"] = f"{self.bin}{os.pathsep}{self._path}"
        self._thread = threading.Thread(target=self._watch, name="desktop-automount", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        os.environ["PATH"] = self._path
        for partition in list(self.mounted):
            _run("umount", partition)
            _run("losetup", "--detach", partition)
        self.mounted.clear()
        with contextlib.suppress(OSError):
            for folder in self.media.iterdir():
                folder.rmdir()
            self.media.rmdir()

    def _remove_leftovers(self) -> None:
        """What a crashed run left mounted under our media folder: unmounted, its loop devices detached."""
        prefix = f"{self.media}/"
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            fields = line.split()
            if fields[4].startswith(prefix):
                _run("umount", fields[4])
                source = fields[fields.index("-") + 2]
                if source.startswith("/dev/loop"):
                    _run("losetup", "--detach", source)

    def wait_mounted(self, timeout: float) -> list[str]:
        """The automounted partitions, once a pass mounted some (or what there is after ``timeout`` seconds)."""
        with self._changed:
            self._changed.wait_for(lambda: bool(self.mounted) and self._settled, timeout)
            return list(self.mounted)

    def unmounted(self) -> list[str]:
        """What ``udisksctl unmount`` has unmounted so far."""
        log = self.bin / UNMOUNT_LOG
        return log.read_text().split() if log.exists() else []

    def _watch(self) -> None:
        """Each new disk with a medium on the port gets automounted once (looked for as a desktop's udisks
        would be told, every :data:`POLL` seconds)."""
        handled: set[tuple[str, str]] = set()
        while not self._stop.wait(POLL):
            present = {(d.node, d.syspath) for d in disks_on_port(UsbPort(self.port)) if d.size > 0}
            if present - handled:
                self.automount()
            handled = present

    def automount(self) -> None:
        """As udisks2 does for a new disk: every partition with a filesystem mounted under media/."""
        with self._busy:  # one disk event after another
            with self._changed:
                self._settled = False
            table = _run("sfdisk", "--json", self.block_device)
            if table.returncode:
                return  # no partition table (an empty eMMC)
            for number, part in enumerate(json.loads(table.stdout)["partitiontable"].get("partitions", []), 1):
                offset, size = part["start"] * 512, part["size"] * 512
                probe = _run("blkid", "--probe", "--offset", str(offset), "--size", str(size), "--output", "value",
                             "--match-tag", "TYPE", self.block_device)
                if not probe.stdout.strip():
                    continue
                target = self.media / f"p{number}"
                target.mkdir(parents=True, exist_ok=True, mode=0o700)
                loop = _run("losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
                            self.block_device).stdout.strip()
                if not loop:
                    continue
                if _run("mount", "-o", "nosuid,nodev", loop, str(target)).returncode:
                    _run("losetup", "--detach", loop)
                    continue
                self.journal.record("host", "automounted", partition=loop, at=str(target),
                                    fstype=probe.stdout.strip())
                with self._changed:
                    self.mounted.append(loop)
            with self._changed:
                self._settled = True
                self._changed.notify_all()


def udisksctl(argv: list[str]) -> int:
    """``udisksctl unmount --block-device DEV [--no-user-interaction]``, the one call the framework makes."""
    args = [a for a in argv if a != "--no-user-interaction"]
    if len(args) != 3 or args[0] != "unmount" or args[1] not in ("--block-device", "-b"):
        print(f"udisksctl (virtual desktop): unsupported call {argv}", file=sys.stderr)
        return 1
    device = args[2]
    done = _run("umount", device)
    if done.returncode:
        print(f"Error unmounting {device}: {done.stderr.strip()}", file=sys.stderr)
        return 1
    _run("losetup", "--detach", device)  # the partition's loop device goes with its mount
    with open(Path(sys.argv[0]).parent / UNMOUNT_LOG, "a") as log:
        log.write(device + "\n")
    print(f"Unmounted {device}.")
    return 0
