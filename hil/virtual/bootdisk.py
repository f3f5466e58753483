"""The eMMC as a virtual module's boot ROM and firmware read it: partitions, boot files, config.txt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hil.errors import HilError
from hil.image import fat
from hil.image.mbr import DiskLayout, Partition, read_layout

FAT_TYPES = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E})
#: config.txt section filters each model obeys (besides [all]).
_FILTERS = {"cm1": {"pi1", "cm1"}, "cm3": {"pi3", "cm3"}, "cm3+": {"pi3", "cm3+"}, "cm4": {"pi4", "cm4"},
            "cm4s": {"pi4", "cm4s"}, "cm5": {"pi5", "cm5"}}


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


@dataclass(frozen=True)
class BootConfig:
    """config.txt as the firmware of one model reads it: later lines win, other models' sections skipped."""

    values: dict[str, str]

    @classmethod
    def parse(cls, text: str, model: str) -> BootConfig:
        values: dict[str, str] = {}
        active = True
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("[") and line.endswith("]"):
                name = line[1:-1].strip().lower()
                active = name == "all" or name in _FILTERS[model]
            elif active and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
        return cls(values)

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.values.get(key)
        return default if value is None else value.strip() not in ("0", "")

