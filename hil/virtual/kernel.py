"""The kernel of a virtual module, from the firmware's hand-over to userspace and the getty, or to where it stops.

As on hardware, a ``root=`` that names no partition makes a kernel with plain ``rootwait`` wait for
ever; ``rootwait=N`` gives up after N seconds and panics, as does a kernel without ``rootwait``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from hil.errors import HilError
from hil.image import ext4
from hil.image.bootfs import ARM64_MAGIC, FDT_MAGIC, ZIMAGE_MAGIC, boot_files
from hil.image.mbr import DiskLayout, Partition, partuuid
from hil.models import ModuleModel
from hil.virtual.bootdisk import BootConfig, BootDisk
from hil.virtual.bootlog import BootLog, Emit, Reboot, Stuck, System
from hil.virtual.chips import CHIPS, Chip
from hil.virtual.firstboot import first_boot

MMC_MAJOR = 179


@dataclass
class _KernelLog:
    """Kernel messages as the console shows them: timestamped, and only those under its loglevel."""

    loglevel: int
    baud: int | None  # None: no serial console, nothing of the kernel's reaches the UART
    now: float = 0.0  # kernel time, seconds since start

    def line(self, seconds: float, text: str, level: int = 6) -> Emit:
        """Advance kernel time by ``seconds`` and say ``text`` at ``level`` (6 info, 3 err, 0 emerg)."""
        self.now += seconds
        if self.baud is None or level >= self.loglevel:
            return Emit(seconds, "", None)
        return Emit(seconds, f"[{self.now:12.6f}] {text}\n", self.baud)

    def lines(self, seconds: float, texts: list[str], level: int = 6) -> list[Emit]:
        return [self.line(seconds if i == 0 else 0.0, t, level) for i, t in enumerate(texts)]


def kernel(model: ModuleModel, chip: Chip, disk: BootDisk, *, started: float,
            config: BootConfig | None = None) -> BootLog:
    """From the firmware handing over (``started`` s after power-on) to the getty, or to where it stops."""
    if config is None:
        config = BootConfig.parse((disk.boot_file("config.txt") or b"").decode("utf-8", "replace"), model.name)
    kernel_file = kernel_name(model, chip, config)
    arm64 = config.flag("arm_64bit", model.name in ("cm4", "cm4s", "cm5")) or not chip.kernel32
    kernel = disk.boot_file(kernel_file)
    dtb = disk.boot_file(config.get("device_tree", boot_files(model.name).dtb))
    title = fdt_model(dtb) if dtb else None
    if kernel is None or title is None or not _runs(kernel, arm64):
        yield Emit(started, "", None)
        # no kernel, a kernel for the wrong mode or no device tree: the CPU runs into garbage
        bits = "64" if arm64 else "32"
        return Stuck(f"{kernel_file} missing or not a {bits}-bit kernel, or no device tree")
    cmdline_data = disk.boot_file(config.get("cmdline", "cmdline.txt")) or b""
    # serial0 is the UART the firmware names so; on a CM5 that is UART10 (the debug header) unless
    # dtparam=uart0_console moves it to GPIO14/15. chip.serial0 is the UART the rig's adapter is wired to.
    serial0 = "ttyAMA0" if model.name == "cm5" and "uart0_console" in config.dtparams else CHIPS[model.name].serial0
    args = kernel_args(cmdline_data.decode("utf-8", "replace").split("\n", 1)[0].strip(), serial0)
    serial_tty, baud = _serial_console(args, chip)
    if not config.flag("enable_uart"):
        serial_tty = None  # the UART pins are not set up: the kernel's console output goes nowhere
    log = _KernelLog(_loglevel(args), baud if serial_tty else None)
    flavour = chip.flavour if arm64 else chip.flavour32
    release = f"6.6.51+rpt-rpi-{flavour}"
    version = "#1 SMP PREEMPT Debian 1:6.6.51-1+rpt3 (2024-10-08)"
    machine = "aarch64" if arm64 else ("armv6l" if model.name == "cm1" else "armv7l")
    cmdline = " ".join(f"{k}={v}" if v is not None else k for k, v in args)
    cpu = f"0x0000000000 [{chip.cpu}]" if arm64 else "0x0"
    emits = [
        log.line(0.0, f"Booting Linux on physical CPU {cpu}"),
        log.line(0.0, f"Linux version {release} (serge@raspberrypi.com) ({'aarch64' if arm64 else 'arm'}"
                      f"-linux-gnu{'' if arm64 else 'eabihf'}-gcc-12 (Debian 12.2.0-14) 12.2.0, GNU ld (GNU "
                      f"Binutils for Debian) 2.40) {version}"),
        log.line(0.0, f"Machine model: {title}"),
        log.line(0.0, "Reserved memory: created CMA memory pool at 0x000000001ac00000, size 320 MiB"),
        log.line(0.0, "Kernel command line: coherent_pool=1M 8250.nr_uarts=1 snd_bcm2835.enable_headphones=0 "
                      f"bcm2708_fb.fbwidth=0 {cmdline}"),
        log.line(0.0, "Memory: 3734956K/4050944K available (12096K kernel code, 2180K rwdata, 4272K rodata)"),
        log.line(0.05, "SMP: Total of 4 processors activated."),
        log.line(0.3, chip.uart_line),
    ]
    yield Emit(started, "", None)
    yield from emits
    if serial_tty:
        yield log.line(0.0, f"printk: console [{serial_tty}] enabled")
    size_gib = disk.size / 1024**3
    parts = " ".join(f"p{p.index}" for p in disk.layout.partitions) if disk.layout else ""
    yield from log.lines(0.4, [chip.mmc_line, "mmc0: new DDR MMC card at address 0001",
                              f"mmcblk0: mmc0:0001 BJTD4R {size_gib:.2f} GiB"])
    yield from log.lines(0.0, [f" mmcblk0:{' ' + parts if parts else ''}",
                               "mmcblk0boot0: mmc0:0001 BJTD4R 4.00 MiB",
                               "mmcblk0boot1: mmc0:0001 BJTD4R 4.00 MiB"])
    root_arg = dict(args).get("root") or ""
    root = _resolve_root(root_arg, disk.layout)
    wait = _rootwait(args)
    if root is None and wait is not None:
        yield log.line(0.0, f"Waiting for root device {root_arg}...")
        if wait == float("inf"):
            return Stuck(f"waiting for root device {root_arg}")
        log.now += wait
        yield Emit(wait, "", None)
    if root is None:
        return (yield from _panic(log, args, disk, root_arg, "0,0", title, release, version, -6))
    if not ext4.is_ext4(disk.image, root):
        yield from log.lines(0.02, [f"EXT4-fs (mmcblk0p{root.index}): VFS: Can't find ext4 filesystem"], 3)
        return (yield from _panic(log, args, disk, root_arg, f"{MMC_MAJOR},{root.index}", title, release,
                                  version, -22))
    yield from log.lines(0.05, [
        f"EXT4-fs (mmcblk0p{root.index}): mounted filesystem with ordered data mode. Quota mode: none.",
        f"VFS: Mounted root (ext4 filesystem) readonly on device {MMC_MAJOR}:{root.index}.",
        "devtmpfs: mounted", "Freeing unused kernel memory: 4096K", "Run /sbin/init as init process"])

    def read(path: str) -> bytes | None:
        try:
            return ext4.read_file(disk.image, root, path)
        except HilError:
            return None

    first_boot(disk.image, disk.boot, root)  # userconf, custom.toml, cloud-init: they log to the journal only
    hostname = (read("/etc/hostname") or b"localhost").decode("utf-8", "replace").strip() or "localhost"
    os_release = _os_release(read("/etc/os-release") or b"")
    pretty = os_release.get("PRETTY_NAME", "Linux")
    console_is_serial = bool(serial_tty) and _last_console(args, chip) == serial_tty
    if console_is_serial and log.loglevel > 4:  # systemd's status goes to /dev/console, the last console=
        yield from log.lines(0.6, ["systemd[1]: systemd 252.33-1~deb12u1 running in system mode "
                                   "(+PAM +AUDIT +SELINUX +APPARMOR +IMA +SMACK +SECCOMP)",
                                   f"systemd[1]: Detected architecture {'arm64' if arm64 else 'arm'}."])
        yield Emit(0.0, f"\nWelcome to {pretty}!\n\n", baud)
        log.now += 0.1
        yield from log.lines(0.0, [f"systemd[1]: Hostname set to <{hostname}>."])
        for unit, text in (("systemd-journald.service", "Journal Service"),
                           ("systemd-udevd.service", "Rule-based Manager for Device Events and Files"),
                           ("systemd-fsck-root.service", "File System Check on Root Device"),
                           ("systemd-remount-fs.service", "Remount Root and Kernel File Systems"),
                           ("ssh.service", "OpenBSD Secure Shell server"),
                           (f"serial-getty@{serial_tty}.service", f"Serial Getty on {serial_tty}")):
            yield Emit(0.9, f"[  OK  ] Started {unit} - {text}.\n", baud)
        yield Emit(0.5, "[  OK  ] Reached target multi-user.target - Multi-User System.\n", baud)
    if serial_tty is None:
        yield Emit(8.0, "", None)
        return Stuck("running, but without a serial console (enable_uart, console=)")
    issue_raw = read("/etc/issue")
    if issue_raw is None:  # Debian composes /etc/issue from os-release; stand-in images may lack it
        name = f"{os_release.get('NAME', 'Linux')} {os_release.get('VERSION_ID', '')}"
        issue_raw = f"{name} \\n \\l\n\n".encode()
    proc = {
        "/proc/device-tree/model": title.encode() + b"\0",
        "/sys/firmware/devicetree/base/model": title.encode() + b"\0",
        "/proc/cmdline": (cmdline + "\n").encode(),
        "/proc/version": f"Linux version {release} (serge@raspberrypi.com) {version}\n".encode(),
    }
    escapes = {"n": hostname, "l": serial_tty, "s": "Linux", "r": release, "m": machine, "\\": "\\"}
    issue = re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), ""), issue_raw.decode("utf-8", "replace"))
    yield Emit(max(0.5, 9.0 - log.now), "", None)  # services start; getty comes last
    return System(disk.image, root, hostname, serial_tty, baud, release, version, machine, issue,
                  console_is_serial and log.loglevel > 4, proc, boot=disk.boot)


def _panic(log: _KernelLog, args: list[tuple[str, str | None]], disk: BootDisk, root_arg: str, block: str,
           title: str, release: str, version: str, error: int) -> BootLog:
    reason = f"VFS: Unable to mount root fs on unknown-block({block})"
    listing = []
    if disk.layout:
        listing.append(f"b300 {disk.size // 1024:16d} mmcblk0 ")
        listing.append(" driver: mmcblk")
        for p in disk.layout.partitions:
            listing.append(f"  b30{p.index} {p.size // 1024:16d} mmcblk0p{p.index} "
                           f"{partuuid(disk.layout.disk_id, p.index)}")
    emits = [
        log.line(0.02, f'VFS: Cannot open root device "{root_arg}" or unknown-block({block}): '
                       f"error {error}", 0),
        log.line(0.0, 'Please append a correct "root=" boot option; here are the available partitions:', 0),
        *(log.line(0.0, line, 0) for line in listing),
        log.line(0.0, f"Kernel panic - not syncing: {reason}", 0),
        log.line(0.0, f"CPU: 0 PID: 1 Comm: swapper/0 Not tainted {release} {version}", 0),
        log.line(0.0, f"Hardware name: {title} (DT)", 0),
        log.line(0.0, f"---[ end Kernel panic - not syncing: {reason} ]---", 0),
    ]
    yield from emits
    seconds = dict(args).get("panic")
    try:
        delay = int(seconds or 0)
    except ValueError:
        delay = 0
    if delay > 0:
        yield Emit(float(delay), "", None)
        return Reboot()
    return Stuck("kernel panic")


def kernel_name(model: ModuleModel, chip: Chip, config: BootConfig) -> str:
    if config.get("kernel"):
        return config.get("kernel")
    files = boot_files(model.name)
    if files.arm64 and chip.kernel32 and not config.flag("arm_64bit", model.name in ("cm4", "cm4s")):
        return chip.kernel32
    return files.kernel


def _runs(kernel: bytes, arm64: bool) -> bool:
    """The header the CPU needs in the mode the firmware starts it in."""
    if arm64:
        return kernel[0x38:0x3C] == ARM64_MAGIC
    return len(kernel) >= 0x28 and struct.unpack_from("<I", kernel, 0x24)[0] == ZIMAGE_MAGIC


def fdt_model(blob: bytes) -> str | None:
    """The root node's ``model`` of a flattened device tree; None if it is not a device tree."""
    if len(blob) < 40:
        return None
    magic, total, off_struct, off_strings = struct.unpack_from(">4I", blob, 0)
    if magic != FDT_MAGIC or total > len(blob):
        return None
    pos, depth = off_struct, 0
    try:
        while pos + 4 <= total:
            token, = struct.unpack_from(">I", blob, pos)
            pos += 4
            if token == 1:  # BEGIN_NODE: a NUL-terminated name, padded to 4
                end = blob.index(b"\0", pos)
                pos = (end + 4) & ~3
                depth += 1
            elif token == 2:
                depth -= 1
            elif token == 3:
                length, name_off = struct.unpack_from(">II", blob, pos)
                value = blob[pos + 8:pos + 8 + length]
                pos = (pos + 8 + length + 3) & ~3
                name = blob[off_strings + name_off:blob.index(b"\0", off_strings + name_off)]
                if depth == 1 and name == b"model":
                    return value.rstrip(b"\0").decode("utf-8", "replace")
            elif token == 9:
                break
            elif token != 4:
                return None
    except (ValueError, struct.error):
        return None
    return "Raspberry Pi"


def kernel_args(line: str, serial0: str) -> list[tuple[str, str | None]]:
    """cmdline.txt as the kernel sees it: the firmware replaces serial0/serial1 with the real tty."""
    args: list[tuple[str, str | None]] = []
    for word in line.split():
        key, sep, value = word.partition("=")
        if key == "console" and value.split(",")[0] == "serial0":
            value = serial0 + value[len("serial0"):]
        args.append((key, value if sep else None))
    return args


def _serial_console(args: list[tuple[str, str | None]], chip: Chip) -> tuple[str | None, int]:
    """The console= naming the UART the rig listens on, and its baud rate (Linux's default 9600)."""
    found: tuple[str | None, int] = (None, 9600)
    for key, value in args:
        if key != "console" or not value:
            continue
        name, _, options = value.partition(",")
        if name == chip.serial0:
            digits = re.match(r"\d+", options)
            found = (name, int(digits.group()) if digits else 9600)
    return found


def _last_console(args: list[tuple[str, str | None]], chip: Chip) -> str | None:
    consoles = [v.partition(",")[0] for k, v in args if k == "console" and v]
    return consoles[-1] if consoles else None


def _loglevel(args: list[tuple[str, str | None]]) -> int:
    level = 7
    for key, value in args:
        if key == "quiet":
            level = 4
        elif key == "loglevel" and value and value.isdigit():
            level = int(value)
    return level


def _rootwait(args: list[tuple[str, str | None]]) -> float | None:
    """None: no rootwait; inf: wait for ever; else the seconds ``rootwait=N`` allows."""
    wait: float | None = None
    for key, value in args:
        if key == "rootwait":
            try:
                wait = float(value) if value else float("inf")
            except ValueError:
                wait = float("inf")
    return wait


def _resolve_root(root: str, layout: DiskLayout | None) -> Partition | None:
    if layout is None:
        return None
    by_partuuid = re.fullmatch(r"PARTUUID=([0-9a-fA-F]{8})-(\d{2})", root)
    if by_partuuid:
        if int(by_partuuid.group(1), 16) != layout.disk_id:
            return None
        index = int(by_partuuid.group(2))
    else:
        by_name = re.fullmatch(r"/dev/mmcblk0p(\d+)", root)
        if not by_name:
            return None
        index = int(by_name.group(1))
    return next((p for p in layout.partitions if p.index == index), None)


def _os_release(data: bytes) -> dict[str, str]:
    values = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            values[key.strip()] = value.strip().strip('"')
    return values


