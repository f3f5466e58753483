"""What Raspberry Pi OS's first boot takes from the boot partition, done to the virtual module's eMMC.

- ``custom.toml`` ``[system] hostname``: raspberrypi-sys-mods' firstboot runs init_config, which sets the
  hostname (/etc/hostname) and removes the file;
- ``userconf.txt`` ``USER:HASH``: userconf-pi's service creates the user with that password hash, in the
  groups the first user gets (sudo among them), and removes the file;
- ``ssh``: the SSH server is enabled and the file removed;
- cloud-init (Trixie): ``user-data`` (hostname, users with their password hash and groups) is applied once per
  ``meta-data`` instance-id; the files stay.

The changes are written into the image itself (debugfs ``-w`` on the root, mtools on the boot partition), so
they persist as on hardware: the next boot finds the user and no userconf.txt.
"""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import yaml

from hil.errors import HilError
from hil.flash.customise import FIRST_USER_GROUPS
from hil.image import ext4, fat
from hil.image.mbr import Partition
from hil.image.tools import run

INSTANCE_FILE = "/var/lib/cloud/data/instance-id"  # where cloud-init keeps the instance it last ran for


def first_boot(image: Path, boot: Partition | None, root: Partition) -> list[str]:
    """Apply what the boot partition asks for; returns what was done (for the module's journal)."""
    if boot is None:
        return []
    done = []

    def boot_text(name: str) -> str | None:
        try:
            data = fat.read_file(image, boot, name)
        except HilError:
            return None
        return None if data is None else data.decode("utf-8", "replace")

    custom = boot_text("custom.toml")
    if custom is not None:
        try:
            hostname = tomllib.loads(custom).get("system", {}).get("hostname")
        except tomllib.TOMLDecodeError:
            hostname = None
        if isinstance(hostname, str) and hostname:
            _write_root(image, root, "/etc/hostname", hostname + "\n")
            done.append(f"hostname {hostname}")
        _remove(image, boot, "custom.toml")
    userconf = boot_text("userconf.txt")
    if userconf is not None:
        user, _, hashed = userconf.strip().partition(":")
        if user and hashed:
            _add_user(image, root, user, hashed)
            done.append(f"user {user} created")
        _remove(image, boot, "userconf.txt")
    user_data, meta_data = boot_text("user-data"), boot_text("meta-data")
    if user_data is not None and meta_data is not None:
        done += _cloud_init(image, root, user_data, meta_data)
    if boot_text("ssh") is not None:
        _remove(image, boot, "ssh")
        done.append("ssh enabled")
    return done


def _cloud_init(image: Path, root: Partition, user_data: str, meta_data: str) -> list[str]:
    """cloud-init's first run for this instance-id: hostname and users from the cloud-config."""
    try:
        meta = yaml.safe_load(meta_data) or {}
        config = yaml.safe_load(user_data) or {}
    except yaml.YAMLError:
        return ["cloud-init: unreadable user-data or meta-data"]
    instance = str(meta.get("instance-id", "")) if isinstance(meta, dict) else ""
    try:
        last = (ext4.read_file(image, root, INSTANCE_FILE) or b"").decode().strip()
    except HilError:
        last = ""
    if not instance or instance == last or not isinstance(config, dict):
        return []
    done = []
    hostname = config.get("hostname")
    if isinstance(hostname, str) and hostname:
        _write_root(image, root, "/etc/hostname", hostname + "\n")
        done.append(f"cloud-init: hostname {hostname}")
    for entry in config.get("users") or []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("passwd"), str):
            _add_user(image, root, entry["name"], entry["passwd"],
                      tuple(str(entry.get("groups", "")).replace(" ", "").split(",")))
            done.append(f"cloud-init: user {entry['name']} created")
    _write_root(image, root, INSTANCE_FILE, instance + "\n")
    return done


def _add_user(image: Path, root: Partition, user: str, hashed: str,
              groups_of_user: tuple[str, ...] = FIRST_USER_GROUPS) -> None:
    def text(path: str) -> str:
        try:
            data = ext4.read_file(image, root, path)
        except HilError:
            data = None
        return (data or b"").decode("utf-8", "replace")

    passwd = [line for line in text("/etc/passwd").splitlines() if line and not line.startswith(f"{user}:")]
    shadow = [line for line in text("/etc/shadow").splitlines() if line and not line.startswith(f"{user}:")]
    passwd.append(f"{user}:x:1000:1000:,,,:/home/{user}:/bin/bash")
    shadow.append(f"{user}:{hashed}:20046:0:99999:7:::")
    groups = []
    for line in text("/etc/group").splitlines():
        name, _, rest = line.partition(":")
        if name in groups_of_user:
            members = [m for m in line.split(":")[-1].split(",") if m]
            line = ":".join(line.split(":")[:-1] + [",".join([*members, user])])
        groups.append(line)
    groups.append(f"{user}:x:1000:")
    for path, lines in (("/etc/passwd", passwd), ("/etc/shadow", shadow), ("/etc/group", groups)):
        _write_root(image, root, path, "\n".join(lines) + "\n")


def _write_root(image: Path, root: Partition, path: str, data: str) -> None:
    """Replace a file of the ext4 root in place (debugfs -w on ``IMAGE?offset=N``)."""
    with tempfile.NamedTemporaryFile("w", prefix="hil-firstboot-") as f:
        f.write(data)
        f.flush()
        device = f"{image}?offset={root.start}"
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):  # missing folders first (an existing one is a harmless error)
            run(["debugfs", "-w", "-R", "mkdir /" + "/".join(parts[:i]), device], package="e2fsprogs", check=False)
        run(["debugfs", "-w", "-R", f"rm {path}", device], package="e2fsprogs", check=False)
        run(["debugfs", "-w", "-R", f"write {f.name} {path}", device], package="e2fsprogs")


def _remove(image: Path, boot: Partition, name: str) -> None:
    run(["mdel", "-i", f"{image}@@{boot.start}", f"::/{name}"], package="mtools", check=False)
