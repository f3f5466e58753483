"""OS customisation at flash time, on the written disk's boot partition, the way Raspberry Pi Imager does it.

A stock Raspberry Pi OS image has its serial console off (no ``enable_uart``), no user (root is locked) and the
hostname ``raspberrypi``. Raspberry Pi's documentation describes what the first boot picks up from the boot
partition, and this module writes exactly that, without mounting (mtools through the guarded descriptor):

- ``config.txt``: ``enable_uart=1`` (and ``dtparam=uart0_console`` on a CM5 whose rig listens on GPIO14/15
  rather than its UART10 debug header); ``cmdline.txt``: ``console=serial0,115200``;
- ``userconf.txt``: ``USER:HASH``, a SHA-512 crypt hash made by ``openssl passwd -6`` as the documentation
  says; the password comes from an environment variable or a file the rig file names, and goes nowhere else;
- ``custom.toml``: ``[system] hostname`` (read by raspberrypi-sys-mods' firstboot/init_config), the rig's name;
- ``ssh``: an empty file enables the SSH server (optional);
- on an image that uses cloud-init (Raspberry Pi OS Trixie has ``user-data`` and ``meta-data`` on its boot
  partition), also ``user-data`` with the same user and hostname and a new ``meta-data`` instance-id, as
  Imager 2 writes them;
- ``hil-run-token.txt``: a token fresh for each flash, which the booted system shows under /boot/firmware.

Each change is returned as data (file and what changed; never the password or its hash), for the report.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hil.errors import HilError, InputError, ProductError
from hil.flash.bootfacts import TOKEN_FILE
from hil.flash.postcheck import LeadingBytes, device_path, set_cmdline, set_config
from hil.flash.sources import Image, head
from hil.image import fat
from hil.image.mbr import SECTOR, Partition, read_layout
from hil.image.tools import need, tool_env
from hil.rig import Rig

STAGE = "flash.customise"
BOOT_MOUNT = "/boot/firmware"  # where Raspberry Pi OS (Bookworm and later) mounts the boot partition
#: The groups Raspberry Pi OS gives its first user (userconf-pi's FIRSTUSERGROUPS; Imager's cloud-init user-data).
FIRST_USER_GROUPS = ("adm", "dialout", "cdrom", "sudo", "audio", "video", "plugdev", "games", "users", "input",
                     "render", "netdev", "spi", "i2c", "gpio")
MIN_FREE = 64 * 1024  # room for config.txt and cmdline.txt growing, userconf.txt, custom.toml, user-data, token
_FAT_IDS = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E})


@dataclass(frozen=True)
class Change:
    """One file on the boot partition and what was done to it."""

    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


@dataclass(frozen=True)
class Plan:
    """What will be written. ``password_hash`` is a crypt hash, never shown in a report."""

    user: str
    password_hash: str
    hostname: str
    ssh: bool
    token: str
    config: dict[str, str]
    console: str

    def __repr__(self) -> str:  # keeps the hash out of tracebacks and logs
        return f"Plan(user={self.user!r}, hostname={self.hostname!r}, ssh={self.ssh}, token={self.token!r})"


def login_password(rig: Rig) -> str:
    """The rig's login password, from the file or environment variable its rig file names.

    A virtual rig without either gets one made once and kept (0600) in its state folder, so separate
    ``hil flash`` and ``hil boot`` runs agree. A real rig without either is refused before anything is touched."""
    c = rig.customise
    if c.password_file is not None:
        return _read_secret(c.password_file)
    value = os.environ.get(c.password_env)
    if value:
        return value
    if rig.virtual is not None:
        return _virtual_password(rig.virtual.state_dir / "login-password")
    raise InputError(f"{rig.name}: no login password for user {c.user!r}: the environment variable "
                     f"{c.password_env} is not set and [customise] names no password_file. Fix: export "
                     f"{c.password_env}=... or set password_file in {rig.path}", stage=STAGE)


def plan(rig: Rig, *, token: str | None = None) -> Plan:
    """The customisation for this rig: user, hash of its password, hostname = the rig's name, its console."""
    c = rig.customise
    config = {"enable_uart": "1"}
    if c.uart == "uart0":  # CM5: the console to GPIO14/15, not the UART10 debug header
        config["dtparam"] = "uart0_console"
    return Plan(c.user, sha512_crypt(login_password(rig)), rig.name, c.ssh, token or secrets.token_hex(8), config,
                "console=serial0,115200")


def sha512_crypt(password: str) -> str:
    """``$6$salt$hash`` as ``openssl passwd -6`` makes it (the password goes on stdin, never argv)."""
    if not password or "\n" in password:
        raise InputError("the login password is empty or has a line break", stage=STAGE)
    proc = subprocess.run([need("openssl", "openssl"), "passwd", "-6", "-stdin"], input=password.encode(),
                          capture_output=True, env=tool_env(), check=False)
    out = proc.stdout.decode().strip()
    if proc.returncode or not out.startswith("$6$"):
        raise InputError("openssl passwd -6 could not hash the login password", stage=STAGE)
    return out


def check_image(image: Image) -> None:
    """Before the write: the image must have a FAT boot partition to customise (InputError if not)."""
    try:
        layout = read_layout(LeadingBytes(head(image, SECTOR), image.size))
    except HilError as e:
        raise _no_fat(image, f"it has no MBR partition table ({e.message})") from None
    boot = next((p for p in layout.partitions if p.type_id in _FAT_IDS), None)
    if boot is None:
        raise _no_fat(image, "no partition is typed FAT")
    sector = head(image, boot.start + SECTOR)[boot.start:]
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        raise _no_fat(image, f"partition {boot.index} holds no FAT file system")
    if not image.compressed:  # a raw image's free space can be read now; a compressed one's only once written
        free = fat.free_bytes(image.path, boot)
        if free is not None and free < MIN_FREE:
            raise InputError(f"{image.path} cannot be customised: its boot partition has {free} bytes free, less "
                             f"than the {MIN_FREE} the customisation files need. Fix: make room on it, or pass "
                             "--no-customise for an image prepared by hand", stage=STAGE)


def apply(fd: int, device: str, boot: Partition, p: Plan) -> list[Change]:
    """Write the customisation onto the written disk's boot partition; then fsync. Returns what changed."""
    path = device_path(fd)
    changes: list[Change] = []

    def write(name: str, data: str, what: str) -> None:
        try:
            fat.write_file(path, boot, name, data.encode())
        except ProductError as e:
            raise ProductError(f"cannot customise {device}: {e.message} (is the boot partition full?)",
                               stage=STAGE) from None
        changes.append(Change(name, what))

    config = (fat.read_file(path, boot, "config.txt") or b"").decode(errors="replace")
    write("config.txt", set_config(config, p.config), ", ".join(f"{k}={v}" for k, v in p.config.items()))
    cmdline = fat.read_file(path, boot, "cmdline.txt")
    if cmdline is None:
        raise ProductError(f"{device} has no cmdline.txt on its boot partition: it is not a Raspberry Pi OS image",
                           stage=STAGE)
    write("cmdline.txt", set_cmdline(cmdline.decode(errors="replace"), [p.console]), p.console)
    write("userconf.txt", f"{p.user}:{p.password_hash}\n", f"user {p.user} (SHA-512 crypt hash of the password)")
    write("custom.toml", f'config_version = 1\n\n[system]\nhostname = "{p.hostname}"\n', f"hostname {p.hostname}")
    if p.ssh:
        write("ssh", "", "SSH server enabled")
    if any(fat.read_file(path, boot, name) is not None for name in ("user-data", "meta-data")):
        # a cloud-init image (Raspberry Pi OS Trixie): Imager writes user-data, and cloud-init runs it again only
        # for a new instance-id
        write("user-data", cloud_config(p), f"cloud-init: user {p.user}, hostname {p.hostname}")
        write("meta-data", f"instance-id: hil-{p.token}\n", f"cloud-init instance-id hil-{p.token}")
    write(TOKEN_FILE, p.token + "\n", f"run token {p.token} (read at {BOOT_MOUNT}/{TOKEN_FILE})")
    os.fsync(fd)
    return changes


def cloud_config(p: Plan) -> str:
    """cloud-init user-data with the hostname and the user (its password as a crypt hash), as Imager writes it for
    images that use cloud-init (strings JSON-quoted, which YAML reads as they are)."""
    return "\n".join([
        "#cloud-config",
        f"hostname: {json.dumps(p.hostname)}",
        "manage_etc_hosts: true",
        "users:",
        f"  - name: {json.dumps(p.user)}",
        f"    groups: {json.dumps(','.join(FIRST_USER_GROUPS))}",
        "    shell: /bin/bash",
        "    lock_passwd: false",
        f"    passwd: {json.dumps(p.password_hash)}",
        '    sudo: "ALL=(ALL) NOPASSWD:ALL"',
        "",
    ])


def _no_fat(image: Image, why: str) -> InputError:
    return InputError(f"{image.path} cannot be customised: {why}. Fix: flash a Raspberry Pi OS image, or pass "
                      "--no-customise (set [customise] enabled = false) for an image prepared by hand", stage=STAGE)


def _read_secret(path: Path) -> str:
    """A password file: no symlink, owned by this user, not readable by group or others; first line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise InputError(f"cannot read the password file {path}: {e.strerror}. Fix: create it (chmod 600), "
                         "not as a symlink", stage=STAGE) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise InputError(f"the password file {path} must be a regular file of yours that only you can read. "
                             f"Fix: chown $USER {path}; chmod 600 {path}", stage=STAGE)
        line = f.read(4096).decode(errors="replace").split("\n", 1)[0].strip()
    if not line:
        raise InputError(f"the password file {path} is empty", stage=STAGE)
    return line


def _virtual_password(path: Path) -> str:
    """A virtual rig's own password, created once (0600, no symlinks followed) in its state folder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(12) + "\n")
    return _read_secret(path)
