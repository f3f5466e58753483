"""What the flashed image will show when it boots, read from the written disk: the boot check's expectations.

Read after the write (and after customisation): whether the serial console is on (``enable_uart`` for the
model and a ``console=`` on the UART), whether the kernel is ``quiet``, the hostname the getty will print, the
run's token, the user that can log in and the root partition's PARTUUID. Kept beside the rig's lock
(``flashed.json``, 0600) so that a later ``hil boot`` knows what the last ``hil flash`` wrote.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass
from typing import Any

from hil.errors import HilError, InputError
from hil.image import ext4, fat
from hil.image.configtxt import BootConfig
from hil.image.mbr import Partition, partuuid, read_layout
from hil.rig import Rig, runtime_dir

STAGE = "boot.facts"
TOKEN_FILE = "hil-run-token.txt"
_SERIAL = ("serial0", "ttyAMA0", "ttyS0", "ttyAMA10")


@dataclass(frozen=True)
class BootFacts:
    serial_console: bool
    why_silent: str  # what keeps the console off ("" when it is on)
    quiet: bool
    hostname: str | None
    token: str | None
    user: str | None  # who logs in: the userconf.txt user, "root" (an unlocked root), None (unknown)
    root_partuuid: str | None  # the root partition's PARTUUID on the written disk
    cmdline_root: str | None  # root= in cmdline.txt
    pretty_name: str | None = None  # /etc/os-release

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_boot_facts(path: str, model: str, boot: Partition, root: Partition) -> BootFacts:
    """The facts of the disk (or image) at ``path`` whose boot and root partitions are given."""
    def boot_text(name: str) -> str | None:
        data = fat.read_file(path, boot, name)
        return None if data is None else data.decode("utf-8", "replace")

    def root_text(name: str) -> str | None:
        try:
            data = ext4.read_file(path, root, name)
        except HilError:
            return None
        return None if data is None else data.decode("utf-8", "replace")

    config = BootConfig.parse(boot_text("config.txt") or "", model)
    args = (boot_text("cmdline.txt") or "").split("\n", 1)[0].split()
    consoles = [a.split("=", 1)[1].split(",")[0] for a in args if a.startswith("console=")]
    why = ""
    if not config.flag("enable_uart"):
        why = "config.txt does not set enable_uart=1, so the serial console is off"
    elif not any(c in _SERIAL for c in consoles):
        why = "cmdline.txt names no console= on the UART (console=serial0,115200)"
    hostname = None
    custom = boot_text("custom.toml")
    if custom:
        try:
            hostname = tomllib.loads(custom).get("system", {}).get("hostname")
        except tomllib.TOMLDecodeError:
            hostname = None
    hostname = hostname or (root_text("/etc/hostname") or "").strip() or None
    user = None
    userconf = boot_text("userconf.txt")
    if any(line.startswith("root::") for line in (root_text("/etc/shadow") or "").splitlines()):
        user = "root"  # the image lets root in without a password (the project's test images): whatever boots it
    elif userconf and ":" in userconf:
        user = userconf.split(":", 1)[0].strip()
    token = (boot_text(TOKEN_FILE) or "").strip() or None
    layout = read_layout(path)
    root_arg = next((a[5:] for a in args if a.startswith("root=")), None)
    pretty = None
    for line in (root_text("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            pretty = line.split("=", 1)[1].strip().strip('"')
    return BootFacts(not why, why, "quiet" in args, hostname, token, user, partuuid(layout.disk_id, root.index),
                     root_arg, pretty)


def save(rig: Rig, facts: BootFacts) -> None:
    """Keep the facts for a later ``hil boot`` (private file, no symlink followed, replaced atomically)."""
    folder = runtime_dir() / rig.name
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / "flashed.json"
    temp = folder / f".flashed.{os.getpid()}"
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(facts.to_dict(), f)
    os.replace(temp, target)


def load(rig: Rig) -> BootFacts | None:
    """What the last flash of this rig wrote, or None (never flashed here, or by another tool)."""
    path = runtime_dir() / rig.name / "flashed.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}. Fix: remove it", stage=STAGE) from None
    with os.fdopen(fd) as f:
        if os.fstat(f.fileno()).st_uid != os.geteuid():
            raise InputError(f"{path} is not yours. Fix: remove it", stage=STAGE)
        try:
            return BootFacts(**json.load(f))
        except (ValueError, TypeError):
            return None
