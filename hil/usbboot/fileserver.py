"""Where the second stage's files come from, as rpiboot's ``check_file`` finds them.

The lookup order is the one in usbboot-protocol.md section 4.3 (per-chip folder first, then the chip's
member of ``bootfiles.bin``, then the folder itself), so a payload folder behaves on this host exactly as it
does under ``rpiboot -d``. Names with ``..`` are refused, and only regular files whose real path lies inside
the payload folder are served: the device must not read outside the payload, through a symlink either.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from hil.errors import InputError
from hil.models import ModuleModel

BOOTFILES = "bootfiles.bin"

# Files whose presence marks an EEPROM recovery payload (section 7): nothing enumerates after Done.
_RECOVERY_MARKERS = ("recovery.bin", "pieeprom.bin", "pieeprom.upd", "pieeprom.sig", "pieeprom.original.bin")


@dataclass(frozen=True)
class FoundFile:
    data: bytes
    source: str  # a path, or "bootfiles.bin:<member>"


class BootFiles:
    """The ustar archive ``bootfiles.bin``: members looked up case-insensitively, as ``bootfiles.c`` does."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with tarfile.open(path, "r:") as tar:
                self._members = {m.name.lower(): m.name for m in tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError) as e:
            raise InputError(f"{path} is not a readable tar archive ({e}). Fix: replace it with the "
                             "bootfiles.bin of a usbboot release", stage="usbboot.payload",
                             file=str(path)) from None

    def read(self, member: str) -> bytes | None:
        name = self._members.get(member.lower())
        if name is None:
            return None
        with tarfile.open(self.path, "r:") as tar:
            f = tar.extractfile(name)
            return f.read() if f else None


class Payload:
    """A boot folder (``rpiboot -d DIR``) seen from one chip family."""

    def __init__(self, folder: Path, model: ModuleModel):
        if not folder.is_dir():
            raise InputError(f"payload folder {folder} does not exist (for a {model.name}). Fix: pass "
                             "--payload DIR or set payload under [usb] in the rig file",
                             stage="usbboot.payload", folder=str(folder))
        self.folder = folder
        self._root = os.path.realpath(folder)
        self.model = model
        bootfiles = folder / BOOTFILES
        self.bootfiles = BootFiles(bootfiles) if bootfiles.is_file() else None

    def find(self, name: str) -> FoundFile | None:
        """The file the device asked for, or None (missing, refused or unreadable)."""
        if not name or ".." in name:
            return None
        rel = name.lstrip("/")
        chip = self.model.chip_dir
        found = self._disk(self.folder / chip / rel)
        if found is None and self.bootfiles is not None:
            data = self.bootfiles.read(f"{chip}/{rel}")
            if data is not None:
                found = FoundFile(data, f"{BOOTFILES}:{chip}/{rel}")
        return found or self._disk(self.folder / rel)

    def second_stage(self) -> FoundFile:
        """The image the boot ROM gets; missing is the user's mistake, reported before any transfer."""
        found = self.find(self.model.second_stage)
        if found is None:
            where = f"{self.folder}, {self.folder / self.model.chip_dir}"
            if self.bootfiles is not None:
                where += f" or {self.bootfiles.path}:{self.model.chip_dir}/"
            raise InputError(f"{self.model.second_stage} (the {self.model.name} second stage) is not in "
                             f"{where}. Fix: point the payload at a usbboot folder made for this model",
                             stage="usbboot.payload", file=self.model.second_stage, folder=str(self.folder))
        return found

    @property
    def is_recovery(self) -> bool:
        """EEPROM recovery payloads end with metadata and no new USB device (section 1.2)."""
        return any((self.folder / name).exists() or (self.folder / self.model.chip_dir / name).exists()
                   for name in _RECOVERY_MARKERS)

    def _disk(self, path: Path) -> FoundFile | None:
        """Only a regular file whose real path lies inside the payload folder: a symlink in the folder must
        not hand the device /etc/shadow, and a FIFO must not hang the server."""
        real = os.path.realpath(path)
        if os.path.commonpath([real, self._root]) != self._root:
            return None
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # missing, a dangling symlink (usbboot#385) or unreadable
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                return FoundFile(f.read(), str(path))
        except OSError:
            return None
        finally:
            os.close(fd)


def parse_metadata(name: str) -> tuple[str, str] | None:
    """``*KEY*VALUE`` as rpiboot's strtok reads it; None when there is no value."""
    parts = [p for p in name[1:].split("*") if p]
    return (parts[0], parts[1]) if len(parts) >= 2 else None


def write_metadata(metadata: dict[str, str], path: Path) -> None:
    path.write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
