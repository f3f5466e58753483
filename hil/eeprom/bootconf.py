"""The bootloader's configuration file (``boot.conf``, stored as ``bootconf.txt`` in the EEPROM image).

The syntax is config.txt's: ``KEY=VALUE`` lines, ``#`` comments and ``[filter]`` sections; everything from a
``[config.txt]`` section on is appended to the OS's config.txt and not the bootloader's business. The
bootloader silently ignores what it does not know, so a misspelt key or a nonsense BOOT_ORDER only shows
as a module that boots the wrong thing, much later. Here every key must be one the bootloader documents
for the module at hand, and BOOT_ORDER is read as the bootloader reads it: hex nibbles, right to left,
each a boot mode, up to RESTART (loop) or STOP.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hil.errors import InputError

STAGE = "eeprom.bootconf"
DEFAULT_BOOT_ORDER = 0xF41  # what the bootloader uses when BOOT_ORDER is absent

#: BOOT_ORDER nibbles: name and what the mode does on a Compute Module.
BOOT_MODES: dict[int, tuple[str, str]] = {
    0x0: ("SD CARD DETECT", "eMMC, then wait for a card change (deprecated: use RESTART)"),
    0x1: ("SD CARD", "the eMMC (the SD interface on a Compute Module)"),
    0x2: ("NETWORK", "TFTP network boot"),
    0x3: ("RPIBOOT", "USB device boot from a host running rpiboot"),
    0x4: ("USB-MSD", "USB mass storage on the xHCI/PCIe ports"),
    0x5: ("BCM-USB-MSD", "USB 2.0 mass storage on the SoC's own USB port"),
    0x6: ("NVME", "an NVMe SSD on PCIe"),
    0x7: ("HTTP", "HTTP boot over Ethernet"),
    0xE: ("STOP", "stop and show the error pattern until power is cycled"),
    0xF: ("RESTART", "start again from the first mode"),
}
STOP, RESTART, RPIBOOT = 0xE, 0xF, 0x3
_NOT_ON = {0x5: ("cm5",)}  # BCM-USB-MSD: "Not available on Raspberry Pi 5"

_Check = Callable[[str], str | None]  # a value's problem, or None


def _integer(low: int | None = None, high: int | None = None) -> _Check:
    def check(value: str) -> str | None:
        try:
            n = int(value, 0)
        except ValueError:
            return f"{value!r} is not a number"
        if low is not None and n < low or high is not None and n > high:
            span = f"from {low} to {high}" if high is not None else f"{low} or more"
            return f"{n} is out of range ({span})"
        return None
    return check


def _choice(*allowed: str) -> _Check:
    return lambda value: None if value in allowed else f"{value!r} is not one of {', '.join(allowed)}"


def _ip(value: str) -> str | None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return f"{value!r} is not a dotted IPv4 address"
    return None


def _mac(value: str) -> str | None:
    return None if re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", value) else \
        f"{value!r} is not a MAC address like dc:a6:32:01:36:c2"


def _text(limit: int | None = None) -> _Check:
    return lambda value: f"is longer than {limit} characters" if limit and len(value) > limit else None


_FLAG = _choice("0", "1")
_ANY = ("cm4", "cm5")
#: Model filters (raspberrypi/documentation, config_txt/conditional.adoc) and the EEPROM modules each selects:
#: what is under ``[cm5]`` is for a CM5 even in a CM4's boot.conf, and is checked as such.
MODEL_FILTERS: dict[str, tuple[str, ...]] = {
    "pi4": ("cm4",), "pi400": ("cm4",), "cm4": ("cm4",), "pi5": ("cm5",), "pi500": ("cm5",), "cm5": ("cm5",),
    "cm4s": (), "pi0": (), "pi0w": (), "pi02": (), "pi1": (), "pi2": (), "pi3": (), "pi3+": (),
}


@dataclass(frozen=True)
class _Key:
    check: _Check
    models: tuple[str, ...] = _ANY


#: The documented bootloader properties (raspberrypi/documentation, eeprom-bootloader.adoc); BOOT_ORDER is
#: parsed on its own.
KNOWN_KEYS: dict[str, _Key] = {
    "BOOT_UART": _Key(_FLAG),
    "UART_BAUD": _Key(_choice("9600", "19200", "38400", "57600", "115200", "230400", "460800", "921600"), ("cm5",)),
    "WAKE_ON_GPIO": _Key(_integer(0, 2)),
    "POWER_OFF_ON_HALT": _Key(_FLAG),
    "WAIT_FOR_POWER_BUTTON": _Key(_FLAG, ("cm5",)),
    "BOOT_ORDER": _Key(lambda value: None),
    "BOOT_WATCHDOG_TIMEOUT": _Key(_integer(0)),
    "BOOT_WATCHDOG_PARTITION": _Key(_integer(0)),
    "MAX_RESTARTS": _Key(_integer(-1)),
    "REBOOT_ON_FATAL_ERROR": _Key(_FLAG),
    "SD_BOOT_MAX_RETRIES": _Key(_integer(-1)),
    "SD_QUIRKS": _Key(_integer(0)),
    "NET_BOOT_MAX_RETRIES": _Key(_integer(-1)),
    "DHCP_TIMEOUT": _Key(_integer(5000)),
    "DHCP_REQ_TIMEOUT": _Key(_integer(500)),
    "TFTP_FILE_TIMEOUT": _Key(_integer(5000)),
    "TFTP_IP": _Key(_ip),
    "TFTP_PREFIX": _Key(_integer(0, 2)),
    "TFTP_PREFIX_STR": _Key(_text(32)),
    "PXE_OPTION43": _Key(_text()),
    "DHCP_OPTION97": _Key(_integer(0, 0xFFFFFFFF)),
    "MAC_ADDRESS": _Key(_mac),
    "MAC_ADDRESS_OTP": _Key(lambda v: None if re.fullmatch(r"[0-7],[0-7]", v) else
                            f"{v!r} is not two customer OTP rows like 0,1"),
    "CLIENT_IP": _Key(_ip),
    "SUBNET": _Key(_ip),
    "GATEWAY": _Key(_ip),
    "DISABLE_HDMI": _Key(_FLAG),
    "HDMI_DELAY": _Key(_integer(0)),
    "ENABLE_SELF_UPDATE": _Key(_FLAG),
    "FREEZE_VERSION": _Key(_FLAG),
    "HTTP_HOST": _Key(_text()),
    "HTTP_PORT": _Key(_integer(1, 65535)),
    "HTTP_PATH": _Key(_text()),
    "HTTP_CACERT_HASH": _Key(lambda v: None if re.fullmatch(r"[0-9a-fA-F]{64}", v) else
                             "is not a SHA-256 hex string"),
    "IMAGER_REPO_URL": _Key(_text()),
    "NET_INSTALL_ENABLED": _Key(_FLAG),
    "NET_INSTALL_AT_POWER_ON": _Key(_FLAG),
    "NET_INSTALL_KEYBOARD_WAIT": _Key(_integer(0)),
    "NETCONSOLE": _Key(_text(32)),
    "PARTITION": _Key(_integer(0)),
    "PARTITION_WALK": _Key(_FLAG),
    "BOOTVAR0": _Key(_integer(0)),
    "PCIE_PROBE": _Key(_FLAG, ("cm5",)),
    "PSU_MAX_CURRENT": _Key(_integer(0), ("cm5",)),
    "USB_MSD_EXCLUDE_VID_PID": _Key(lambda v: None if re.fullmatch(r"[0-9a-fA-F]{8}(,[0-9a-fA-F]{8}){0,3}", v)
                                    else "is not up to four VIDPID pairs like 034700a0,a4231234"),
    "USB_MSD_DISCOVER_TIMEOUT": _Key(_integer(5000)),
    "USB_MSD_LUN_TIMEOUT": _Key(_integer(100)),
    "USB_MSD_PWR_OFF_TIME": _Key(_integer(0, 5000), ("cm4",)),
    "USB_MSD_STARTUP_DELAY": _Key(_integer(0, 30000)),
    "VL805": _Key(_FLAG, ("cm4",)),
    "XHCI_DEBUG": _Key(_integer(0)),
    "SDRAM_BANKLOW": _Key(_integer(0, 4)),
}


class BootOrderError(ValueError):
    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@dataclass(frozen=True)
class BootOrder:
    """BOOT_ORDER as the bootloader walks it: ``modes`` in the order tried (lowest nibble first)."""

    value: int
    modes: tuple[int, ...]

    @property
    def loops(self) -> bool:
        return self.modes[-1] == RESTART

    def names(self) -> list[str]:
        return [BOOT_MODES[m][0] for m in self.modes]

    def reaches(self, mode: int) -> bool:
        """Whether ``mode`` is ever tried (the bootloader never gets past a mode that does not fail)."""
        return mode in self.modes

    def __str__(self) -> str:
        return f"0x{self.value:x} ({' -> '.join(self.names())})"


def parse_boot_order(text: str, model: str) -> BootOrder:
    """Read ``0x...`` right to left; raises :class:`BootOrderError` with the problem and the fix."""
    example = "0xf41 (eMMC, then USB-MSD, then again) or 0xf21 (eMMC, then network, then again)"
    digits = text.strip().lower()
    if not re.fullmatch(r"0x[0-9a-f]+", digits):
        raise BootOrderError(f"{text!r} is not a hex number", f"write the boot modes as hex nibbles, e.g. {example}")
    value = int(digits, 16)
    if value == 0:
        raise BootOrderError("0x0 names no boot mode", f"give at least one mode, e.g. {example}")
    nibbles = f"{value:x}"
    if len(nibbles) > 8:
        raise BootOrderError(f"{text} has {len(nibbles)} nibbles; the bootloader reads at most 8",
                             "drop modes from the left")
    modes = tuple(int(c, 16) for c in reversed(nibbles))
    for position, mode in enumerate(modes, 1):
        where = f"nibble {position} from the right (0x{mode:x})"
        if mode not in BOOT_MODES:
            known = ", ".join(f"0x{m:x} {name}" for m, (name, _) in BOOT_MODES.items())
            raise BootOrderError(f"{where} is no boot mode", f"use only {known}")
        if model in _NOT_ON.get(mode, ()):
            raise BootOrderError(f"{where} is {BOOT_MODES[mode][0]}, which a {model} does not have",
                                 "remove that nibble")
    for position, mode in enumerate(modes[:-1], 1):
        later = modes[position:]
        if mode in (STOP, RESTART) or mode == RPIBOOT and any(m not in (STOP, RESTART) for m in later):
            name = BOOT_MODES[mode][0]
            rest = "".join(f"{m:x}" for m in reversed(later))
            why = "never times out" if mode == RPIBOOT else "ends the walk"
            raise BootOrderError(f"nibble {position} from the right is {name} (0x{mode:x}), which {why}, so the modes "
                                 f"left of it (0x{rest}) are never tried", f"put {name} last (leftmost)")
    if modes[0] in (STOP, RESTART):
        raise BootOrderError(f"{text} starts with {BOOT_MODES[modes[0]][0]} and tries no boot mode",
                             f"put boot modes right of it, e.g. {example}")
    return BootOrder(value, modes)


@dataclass(frozen=True)
class BootConf:
    """A validated boot.conf. ``settings`` are the ones this model always applies (top, ``[all]``, or a model
    filter that selects it such as ``[cm5]`` on a CM5)."""

    text: str
    model: str
    settings: dict[str, str] = field(default_factory=dict)
    boot_order: BootOrder = BootOrder(DEFAULT_BOOT_ORDER, (0x1, 0x4, 0xF))

    @property
    def boot_uart(self) -> bool:
        """The bootloader reports on the UART (its default is silence)."""
        return self.settings.get("BOOT_UART") == "1"


def parse_bootconf(text: str, model: str, source: object = "boot.conf") -> BootConf:
    """Validate ``text`` for a ``model`` ("cm4" or "cm5"); one :class:`InputError` naming line, key and fix."""
    if model not in _ANY:
        raise InputError(f"a {model} has no bootloader EEPROM; boot.conf applies to cm4 and cm5 only",
                         stage=STAGE)

    def fail(line: int, key: str, problem: str, fix: str) -> InputError:
        return InputError(f"{source}: line {line}: {key}: {problem}. Fix: {fix}", stage=STAGE, key=key, line=line)

    settings: dict[str, str] = {}
    order = BootOrder(DEFAULT_BOOT_ORDER, (0x1, 0x4, 0xF))
    unconditional = True
    for_models: tuple[str, ...] = (model,)  # the modules the current section's settings are for
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section == "config.txt":
                break  # the rest belongs to the OS's config.txt
            for_models = MODEL_FILTERS.get(section, (model,))
            unconditional = section == "all" or section in MODEL_FILTERS and for_models == (model,)
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not key:
            raise fail(number, line[:40], "is not KEY=VALUE", "write one setting per line as KEY=VALUE, or comment "
                                          "it out with #")
        spec = KNOWN_KEYS.get(key)
        if spec is None:
            if key.upper() in KNOWN_KEYS:
                raise fail(number, key, "bootloader keys are upper case", f"write {key.upper()}")
            near = difflib.get_close_matches(key.upper(), KNOWN_KEYS, n=1, cutoff=0.7)
            raise fail(number, key, "is not a bootloader setting (the bootloader would silently ignore it)",
                       f"did you mean {near[0]}?" if near else "remove it; see the bootloader configuration "
                       "properties in the Raspberry Pi documentation")
        if for_models and not set(for_models) & set(spec.models):
            where = model if for_models == (model,) else " or ".join(for_models)
            raise fail(number, key, f"does not exist on a {where} (only on {', '.join(spec.models)})", "remove it")
        if key == "BOOT_ORDER":
            try:
                parsed = parse_boot_order(value, for_models[0] if len(for_models) == 1 else model)
            except BootOrderError as e:
                raise fail(number, key, e.problem, e.fix) from None
            if unconditional:
                order = parsed
        else:
            problem = spec.check(value)
            if problem:
                raise fail(number, key, problem, f"give {key} a valid value")
        if unconditional:
            settings[key] = value
    return BootConf(text, model, settings, order)
