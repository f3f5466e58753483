"""Proof, from the serial console, that the module booted the image just written.

A flash that "succeeded" proves little: the module may boot an older image, fall back to USB boot, or
panic. After the power cycle the console must show each boot milestone in order, each within its stage
timeout counted from power-on. Which milestones a boot shows depends on the module and on the image
(:class:`hil.flash.bootfacts.BootFacts`): the EEPROM bootloader's banner only where its config says
BOOT_UART=1 (the factory default is 0), the kernel's first line only without ``quiet``, any extra rig
markers, then ``HOSTNAME login:``. A known-fatal line (a panic, an unmountable root, a bootloader that
finds no filesystem or cycles through its boot order, missing firmware) ends the wait at once, with the
line as evidence. After login as the configured user, the run's token, /etc/os-release, issue.txt,
``uname -r`` and the root PARTUUID in /proc/cmdline identify what booted (and ``/etc/build-id`` where
one is expected). The time to each milestone is recorded so boot-time regressions show up in reports.

Failures are classified: silence where a bootloader always talks, or an unreadable line, points at the
rig; a missing milestone, a forbidden line (panic, Oops) or another build-id at the module or image.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hil.control.console import Console
from hil.errors import Fault, HilError, InfrastructureError, InputError, ProductError, StageTimeout
from hil.flash.bootfacts import TOKEN_FILE, BootFacts
from hil.flash.customise import BOOT_MOUNT, login_password
from hil.rig import DEFAULT_MARKERS, Rig

BUILD_ID_MARKER = "build_id"  # a rig marker whose first group is the build-id printed during boot
BUILD_ID_FILE = "/etc/build-id"

#: Lines after which a boot never reaches a login prompt: the wait ends at once, with the line as evidence.
FATAL: tuple[tuple[str, str], ...] = (
    (r"Kernel panic - not syncing[^\n]*", "the kernel panicked"),
    (r"VFS: Unable to mount root fs[^\n]*",
     "the kernel cannot mount its root filesystem: check root= in cmdline.txt against the partitions"),
    (r"Filesystem not found[^\n]*",
     "the bootloader found no boot filesystem on the eMMC: it is blank or the image is damaged"),
    (r"Boot mode: (?P<mode>\S+) \(\w+\)[^\n]*\n(?:[^\n]*\n)*?Boot mode: (?P=mode) \(\w+\)[^\n]*",
     "the bootloader went through its whole BOOT_ORDER and starts again: nothing it can boot"),
    (r"Firmware not found[^\n]*",
     "the firmware (start*.elf) is missing from the boot partition"),
)

#: What the console shows when a boot goes wrong in a known way, and what it means.
_HINTS: tuple[tuple[str, str], ...] = (
    (r"Filesystem not found|Failed to open device: 'sdcard'",
     "the bootloader found no boot filesystem on the eMMC: it is blank or the image is damaged"),
    (r"Waiting for root device", "the kernel cannot find its root filesystem: check root= in cmdline.txt"),
)


@dataclass
class BootRecord:
    """One boot: which build came up and how long each milestone took after power-on (seconds)."""

    rig: str
    model: str
    expected_build_id: str | None
    build_id: str | None = None
    markers: dict[str, float] = field(default_factory=dict)
    identity: dict[str, str] = field(default_factory=dict)  # user, token, os-release, issue, uname -r, PARTUUID
    log: str | None = None
    console_from: int = 0  # the console's line index where this boot starts (for report slices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def boot_markers(rig: Rig, facts: BootFacts | None = None) -> list[tuple[str, str]]:
    """The milestones a boot of this rig and image shows, in order.

    The bootloader banner only where the module has an EEPROM bootloader whose config says BOOT_UART=1
    (``[customise] bootloader_uart``); the kernel's first line only without ``quiet`` (unknown image: expected);
    extra rig markers come between the kernel and the login prompt, which names the image's hostname."""
    names = (["bootloader"] if rig.model.has_eeprom and rig.customise.bootloader_uart else [])
    names += [] if facts is not None and facts.quiet else ["kernel"]
    names += [n for n in rig.markers if n not in ("bootloader", "kernel", "login")]
    markers = dict(rig.markers)
    if facts is not None and facts.hostname and markers["login"] == DEFAULT_MARKERS["login"]:
        markers["login"] = rf"^{re.escape(facts.hostname)} login: ?$"
    names.append("login")
    return [(n, markers[n]) for n in names if n in markers]


def check_console(rig: Rig, facts: BootFacts | None) -> None:
    """Before power-on: an image whose serial console is off can never be confirmed (InputError)."""
    if facts is not None and not facts.serial_console:
        raise InputError(f"the image on {rig.name}'s eMMC has its serial console off: {facts.why_silent}. No boot "
                         "can be confirmed on the console. Fix: flash it with customisation (without --no-customise), "
                         "or enable the UART yourself (enable_uart=1, console=serial0,115200)", stage="boot.console")


def confirm_boot(console: Console, rig: Rig, *, powered_at: float, expect_build_id: str | None = None,
                 login: bool = True, usb_fallback: Callable[[], bool] | None = None,
                 console_from: int = 0, facts: BootFacts | None = None) -> BootRecord:
    """Follow a boot that started at ``powered_at`` (console time) and prove which image it is.

    ``usb_fallback`` tells whether the boot ROM now sits on the USB port: where a silent module has
    fallen back to USB boot, its eMMC had nothing bootable. ``facts``: what the flashed image shows (None:
    unknown, the old rules: kernel line, root login, /etc/build-id)."""
    check_console(rig, facts)
    record = BootRecord(rig.name, rig.model.name, expect_build_id,
                        log=str(console.log_path) if console.log_path else None, console_from=console_from)
    fatal = "|".join(f"(?P<fatal{i}>{p})" for i, (p, _) in enumerate(FATAL))
    for name, pattern in boot_markers(rig, facts):
        timeout = rig.timeouts.get(name, rig.timeouts["login"])
        left = max(0.0, powered_at + timeout - console.now())
        try:
            m = console.expect(re.compile(f"(?P<marker>{pattern})|{fatal}", re.MULTILINE), left,
                               stage=f"boot.{name}", what=f"{name} marker {pattern!r}")
        except StageTimeout as e:
            raise _classify(e, console, rig, name, timeout, usb_fallback) from None
        _raise_fatal(m, name, console)
        record.markers[name] = round(console.arrival(m) - powered_at, 3)
        if name == BUILD_ID_MARKER:
            inner = re.search(pattern, m.group("marker"))
            got = inner.group(1) if inner and inner.groups() else m.group("marker")
            _check_build_id(got, expect_build_id, "printed during boot")
            record.build_id = got
    if login:
        try:
            _login(console, rig, facts)
            _identify(console, rig, facts, record)
        except StageTimeout as e:
            raise _retyped(e) from None
        record.markers["shell"] = round(console.now() - powered_at, 3)
    return record


def _raise_fatal(m: re.Match[str], name: str, console: Console) -> None:
    for i, (_, meaning) in enumerate(FATAL):
        line = m.group(f"fatal{i}")
        if line is not None:
            last = line.strip().splitlines()[-1]
            raise ProductError(f"the boot cannot go on: {meaning}. The console showed {last!r} while waiting for the "
                               f"{name} marker", stage=f"boot.{name}", line=last,
                               log=console.log_path and str(console.log_path), tail=console.tail(40))


def _login(console: Console, rig: Rig, facts: BootFacts | None) -> None:
    """Log in as root without a password where the image allows it (the project's test images), else as the
    configured user with the rig's password."""
    if facts is None or facts.user == "root":
        console.login(timeout=rig.timeouts["login"], prompt_seen=True)
        return
    console.login(facts.user or rig.customise.user, login_password(rig), timeout=rig.timeouts["login"],
                  prompt_seen=True)


def _identify(console: Console, rig: Rig, facts: BootFacts | None, record: BootRecord) -> None:
    """Which image runs: the run's token, os-release, issue.txt, kernel release, root PARTUUID, build-id."""
    timeout = rig.timeouts["command"]

    def read(command: str) -> str | None:
        result = console.run(command, timeout=timeout)
        return result.output.strip() if result.status == 0 else None

    who = read("id -un")
    if who:
        record.identity["user"] = who
    if who and who != "root":  # root for what needs it, without a password prompt that would hang the console
        record.identity["sudo"] = "yes" if read("sudo -n true") is not None else "no"
    if facts is not None and facts.token:
        token = read(f"cat {BOOT_MOUNT}/{TOKEN_FILE}")
        if token != facts.token:
            raise ProductError(f"the module booted, but its run token is {token!r}, not {facts.token!r} written by "
                               "this flash: it booted another image (the write did not reach the eMMC?)",
                               stage="boot.identity", got=token, expected=facts.token)
        record.identity["token"] = token
    release = _os_release(read("cat /etc/os-release") or "")
    for key in ("PRETTY_NAME", "VERSION_ID"):
        if key in release:
            record.identity[key] = release[key]
    if facts is not None and facts.pretty_name and release.get("PRETTY_NAME") != facts.pretty_name:
        raise ProductError(f"the module runs {release.get('PRETTY_NAME')!r}, not {facts.pretty_name!r} as on the "
                           "flashed disk", stage="boot.identity")
    issue = read(f"cat {BOOT_MOUNT}/issue.txt")
    if issue:
        record.identity["issue.txt"] = issue.splitlines()[0]
    kernel = read("uname -r")
    if kernel:
        record.identity["kernel"] = kernel
    cmdline = read("cat /proc/cmdline") or ""
    root = next((w[len("root="):] for w in cmdline.split() if w.startswith("root=")), None)
    if root:
        record.identity["root"] = root
    if (facts is not None and facts.root_partuuid and root and root.startswith("PARTUUID=")
            and root != f"PARTUUID={facts.root_partuuid}"):
        raise ProductError(f"the running kernel's root is {root}, but the flashed disk's root partition is "
                               f"PARTUUID={facts.root_partuuid}: it booted from another disk", stage="boot.identity")
    build_id = read(f"cat {BUILD_ID_FILE}")
    if build_id is None and record.expected_build_id is not None:
        raise ProductError(f"the module booted, but {BUILD_ID_FILE} cannot be read: the image is not a test image "
                           "or not the one written", stage="boot.build-id")
    if build_id is not None:
        record.build_id = build_id
        _check_build_id(build_id, record.expected_build_id, f"in {BUILD_ID_FILE}")


def _os_release(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            values[key.strip()] = value.strip().strip('"')
    return values


def _check_build_id(got: str, expected: str | None, where: str) -> None:
    if expected is not None and got != expected:
        raise ProductError(f"the module booted build-id {got!r} ({where}), not {expected!r}, the image just "
                           "written: the write did not reach the eMMC, or the module booted something else",
                           stage="boot.build-id", got=got, expected=expected)


def _classify(e: StageTimeout, console: Console, rig: Rig, name: str, timeout: float,
              usb_fallback: Callable[[], bool] | None) -> HilError:
    """A missing milestone, blamed on whoever the evidence points at."""
    if console.received == 0:
        if usb_fallback is not None and usb_fallback():
            return ProductError(f"the console stayed silent and the boot ROM appeared on USB port {rig.usb_port}: "
                                "the module found nothing bootable on its eMMC (blank or damaged image)",
                                stage=e.stage, log=console.log_path and str(console.log_path))
        if rig.model.has_eeprom and rig.customise.bootloader_uart:
            return InfrastructureError(
                f"nothing at all arrived on the console {console.device} within {timeout:g} s of power-on, though "
                f"the rig says its {rig.model.name}'s bootloader prints its banner (BOOT_UART=1). Fix: check the "
                "USB-serial adapter, its wiring (TX/RX, ground) and that power reaches the module", stage=e.stage,
                log=console.log_path and str(console.log_path))
    tail = console.tail(40)
    for pattern, hint in _HINTS:
        if re.search(pattern, tail):
            return ProductError(f"{e.message}\n{hint}", stage=e.stage, **e.evidence)
    return _retyped(e)


def _retyped(e: StageTimeout) -> HilError:
    """A stage timeout as the error class of whoever it blames."""
    cls = ProductError if e.fault is Fault.PRODUCT else InfrastructureError
    return cls(e.message, stage=e.stage, **e.evidence)
