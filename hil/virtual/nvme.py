"""The NVMe drive of a virtual carrier board (CM4/CM5 IO board with an M.2 slot): a sparse file, behind a loop
device when run as root, that mass-storage-gadget64 exports as a second disk beside the eMMC."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from hil.errors import InfrastructureError
from hil.hostenv import outside_umockdev

STAGE = "virtual.nvme"


class VirtualNvme:
    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.loop = ""

    @property
    def block_device(self) -> str:
        """What the gadget's second disk reaches: the loop device, else the file."""
        return self.loop or str(self.path)

    def open(self) -> VirtualNvme:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        if os.geteuid() == 0:
            done = subprocess.run(["losetup", "--find", "--show", str(self.path)], capture_output=True, text=True,
                                  env=outside_umockdev(), check=False)
            if done.returncode:
                raise InfrastructureError(f"no loop device for the virtual NVMe {self.path}: {done.stderr.strip()}. "
                                          "Fix: free a loop device (losetup -a)", stage=STAGE)
            self.loop = done.stdout.strip()
        return self

    def close(self) -> None:
        if self.loop:
            subprocess.run(["losetup", "--detach", self.loop], capture_output=True, env=outside_umockdev(),
                           check=False)
            self.loop = ""
