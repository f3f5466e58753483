"""The eMMC as a virtual module's boot ROM and firmware read it: partitions, boot files, config.txt."""

from __future__ import annotations

from pathlib import Path

from hil.errors import HilError
from hil.image import fat
from hil.image.configtxt import BootConfig
from hil.image.mbr import DiskLayout, Partition, read_layout

FAT_TYPES = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E})


class BootDisk:
    """The eMMC as the SoC reads it; an unreadable structure is simply absent, as to a boot ROM."""

    def __init__(self, image: Path):
        self.image = image
        self.size = image.stat().st_size if image.exists() else 0
        try:
            self.layout: DiskLayout | None = read_layout(image)
        except (HilError, OSError):
            self.layout = None
        self.boot: Partition | None = None
        if self.layout:
            for p in self.layout.partitions:
                if p.type_id in FAT_TYPES and fat.fat_type(image, p):
                    self.boot = p
                    break

    def boot_file(self, name: str) -> bytes | None:
        if self.boot is None:
            return None
        try:
            return fat.read_file(self.image, self.boot, name)
        except HilError:
            return None

    def boot_sector(self) -> bytes:
        assert self.boot is not None
        with open(self.image, "rb") as f:
            f.seek(self.boot.start)
            return f.read(512)


__all__ = ["FAT_TYPES", "BootConfig", "BootDisk"]
