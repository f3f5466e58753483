"""Rig files (``rigs/*.toml``) become typed, validated, immutable objects.

This module only *describes* a rig: what lines, ports, disks and consoles exist. Separate classes know
how to drive each of them. Every problem is reported as a :class:`RigFileError` naming the file, the
key and the fix, so a broken rig file never surfaces as a traceback.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.errors import RigFileError
from hil.models import MODELS, ModuleModel, emmc_size_plausible
from hil.runtime import default_runtime_dir
from hil.units import parse_size
from hil.usbport import MAX_DEPTH, UsbPort

PIN_FACTORIES = ("mock", "lgpio", "rpigpio", "pigpio", "native")
_RIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: Stage timeouts in seconds. Defaults follow usbboot-protocol.md section 8 and 9.10.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "power": 5.0,  # relay switched and read back
    "rom": 10.0,  # boot ROM appears on the port after power-on
    "rom_transfer": 20.0,  # boot message, second stage and status
    "second_stage": 10.0,  # second stage re-enumerates
    "file_server": 60.0,  # the whole file-server session
    "mass_storage": 30.0,  # mass-storage device and its disk appear after Done
    "flash": 1800.0,  # write and verify
    "bootloader": 20.0,  # first bootloader line after power-on (CM4/CM5)
    "kernel": 60.0,  # first kernel line
    "login": 120.0,  # login prompt
    "command": 30.0,  # a shell command after login
}

#: What the console says at each boot milestone (regular expressions).
DEFAULT_MARKERS: dict[str, str] = {
    "bootloader": r"RPi: BOOTLOADER release",
    "kernel": r"Booting Linux on physical CPU",
    "login": r"login: ?$",
}

#: Lines that must never appear on a console: any of them fails the boot as a product fault.
DEFAULT_FORBIDDEN: tuple[str, ...] = (
    r"Kernel panic - not syncing",
    r"Internal error: Oops",
    r"\bBUG: ",
    r"Unable to handle kernel",
)


@dataclass(frozen=True)
class RelayLine:
    """One GPIO-driven relay. ``active_high``: the relay is energised when the GPIO is high.

    "On" always means the line's asserted meaning: power applied, nRPI_BOOT pulled low (USB boot),
    EEPROM_nWP pulled low (write protection effective).
    """

    role: str
    gpio: int
    active_high: bool
    pin_factory: str
    #: the relay's state when no process drives the GPIO (set by the board's pull resistors): True = energised
    rest_on: bool = False


@dataclass(frozen=True)
class Relays:
    power: RelayLine | None
    nrpi_boot: RelayLine | None
    eeprom_nwp: RelayLine | None
    off_time: float  # seconds with power cut before power may return, so the module discharges
    nwp_protect_at_rest: bool  # resting level of EEPROM_nWP: True = pulled low (protected)

    def lines(self) -> list[RelayLine]:
        return [x for x in (self.power, self.nrpi_boot, self.eeprom_nwp) if x is not None]


POWER_BACKENDS = ("relay", "uhubctl", "command")


@dataclass(frozen=True)
class Power:
    """What switches the module's supply: the power relay, a hub port (uhubctl) or external commands.

    ``command`` backends give argument lists: ``on`` and ``off`` switch, ``status`` (optional) prints
    ``on`` or ``off`` so the state can be read back.
    """

    backend: str = "relay"
    hub: str = ""  # uhubctl: the hub's location (-l), e.g. 1-1
    port: int = 0  # uhubctl: the port on that hub (-p)
    program: str = "uhubctl"
    on: tuple[str, ...] = ()
    off: tuple[str, ...] = ()
    status: tuple[str, ...] = ()


@dataclass(frozen=True)
class UsbBootOptions:
    """How the USB boot host treats the boot ROM and which disk it writes after (``[usb]`` keys ``rom_retries``,
    ``signed_boot``, ``disk``).

    ``rom_retries``: failed ROM exchanges repeated per boot, as rpiboot repeats them (without its bound);
    ``signed``: send ``bootcode.sig`` in the boot message to a BCM2835/2837 (``rpiboot -s``);
    ``disk``: mass-storage-gadget64 exports a carrier's NVMe beside the eMMC; the eMMC is written unless
    ``disk = "nvme"``."""

    rom_retries: int = 2
    signed: bool = False
    disk: str = "emmc"  # which disk of the module to write: "emmc", or "nvme" on a carrier with an M.2 drive


@dataclass(frozen=True)
class Console:
    """The module's serial console: a device path or a pyserial URL (``rfc2217://``, ``socket://``)."""

    device: str
    baud: int
    virtual: bool = False

    @property
    def is_url(self) -> bool:
        return "://" in self.device


@dataclass(frozen=True)
class EmmcFault:
    offset: int
    length: int
    op: str  # "read", "write" or "both"


@dataclass(frozen=True)
class VirtualEmmc:
    write_bps: float  # bytes per second, 0 = unlimited
    read_bps: float
    io_errors: tuple[EmmcFault, ...]
    loop_device: bool  # put a loop device over the file when running as root


@dataclass(frozen=True)
class Virtual:
    """How the virtual module behaves: timings, speed model, quirks and faults."""

    speedup: float
    state_dir: Path
    emmc: VirtualEmmc
    usb: Mapping[str, Any]  # quirks and faults of the USB side, validated by the virtual USB model
    console: Mapping[str, Any]  # faults of the console side (unplug, garbage)
    #: USB port -> its host controller and profile ("xhci-lenient", "ehci-hypothesis-maxpacket"), checked by the
    #: virtual bus; ports not listed hang off a lenient xHCI controller
    controllers: Mapping[UsbPort, str] = field(default_factory=dict)
    #: what boots from the eMMC: "model" (the simulated boot chain) or "qemu" (a real kernel; cm3 and cm3+)
    boot_engine: str = "model"
    #: relay line -> energised at rest on the virtual board, where it differs from the rig's declared rest
    relay_rest: Mapping[str, bool] = field(default_factory=dict)
    #: how the module's USB side reaches the host: "umockdev" (faked behind libusb and udev in the process) or
    #: "kernel" (commands run in a QEMU guest whose own Linux USB stack sees the module)
    transport: str = "umockdev"


TRANSPORTS = ("umockdev", "kernel")
LOCK_BACKENDS = ("local", "labgrid")
_TAG_KEY = re.compile(r"^[a-z][a-z0-9_]+$")  # what labgrid accepts as a tag key


@dataclass(frozen=True)
class Lab:
    """How the rig is shared: ``local`` (a lock on this controller) or ``labgrid`` (a place on the lab's
    coordinator, named ``place``, tagged with the model, rig, site and ``tags``)."""

    lock: str = "local"
    coordinator: str = "127.0.0.1:20408"
    place: str = ""
    site: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    allow_remote_coordinator: bool = False


@dataclass(frozen=True)
class Customise:
    """``[customise]``: how the written image is prepared and logged into, as Raspberry Pi Imager's OS
    customisation does it. The password itself never appears here: only where to find it."""

    enabled: bool = True  # false: the image was prepared by its user (as --no-customise)
    user: str = "hil"
    password_env: str = "HIL_LOGIN_PASSWORD"  # the environment variable holding the login password
    password_file: Path | None = None  # or a file holding it (owned by this user, not readable by others)
    ssh: bool = False
    uart: str = ""  # CM5: "uart10" (the debug header, its default console) or "uart0" (GPIO14/15)
    bootloader_uart: bool = False  # the module's EEPROM config says BOOT_UART=1 (factory: 0)


@dataclass(frozen=True)
class Rig:
    name: str
    path: Path
    model: ModuleModel
    emmc_size: int
    relays: Relays
    usb_ports: tuple[UsbPort, ...]  # parsed once, here; the first is where the module is cabled
    payload: Path | None
    console: Console
    timeouts: Mapping[str, float]
    markers: Mapping[str, str]
    forbidden: tuple[str, ...]
    virtual: Virtual | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    power: Power = field(default_factory=Power)
    customise: Customise = field(default_factory=lambda: Customise())
    usb_boot: UsbBootOptions = field(default_factory=UsbBootOptions)
    #: USB port -> the command that connects the module to it (a USB switch, uhubctl), for ``hil matrix``
    usb_select: Mapping[UsbPort, tuple[str, ...]] = field(default_factory=dict)
    lab: Lab = field(default_factory=Lab)

    @property
    def usb_port(self) -> UsbPort:
        """The module's USB slave port as ``bus-port.port...`` (the identity that survives re-enumeration)."""
        return self.usb_ports[0]

    @property
    def is_virtual(self) -> bool:
        return self.virtual is not None

    @property
    def time_scale(self) -> float:
        """Host seconds per second of the module's own time: 1 on hardware, 1/speed-up on a virtual rig whose
        module runs faster than real time (waits for its readiness shrink with it)."""
        return 1.0 / self.virtual.speedup if self.virtual is not None else 1.0


def parse_stage_timeout(item: str) -> tuple[str, float] | None:
    """``STAGE=SECONDS`` from a command line, or None unless the stage is known and the seconds positive."""
    stage, _, value = item.partition("=")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return (stage, seconds) if stage in DEFAULT_TIMEOUTS and 0 < seconds <= MAX_SECONDS else None


def runtime_dir() -> Path:
    """Where live rig state (locks, virtual consoles) goes; overridable for tests and parallel runs
    (:func:`hil.runtime.default_runtime_dir`; whoever creates files there uses :mod:`hil.runtime`)."""
    return default_runtime_dir()


#: The largest number of seconds (timeouts, waits) or MB/s a rig file may give: a day. Anything larger is
#: a typo, and ``inf`` would wait forever.
MAX_SECONDS = 86400.0


def _finite(t: _Table, name: str, value: Any) -> None:
    """No nan or inf anywhere: TOML allows them, and an inf timeout waits forever, a nan compares false."""
    if isinstance(value, float) and not math.isfinite(value):
        raise t.fail(name, f"must be a finite number, not {value}", "write a finite number")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _finite(t, f"{name}[{i}]", item)


class _Table:
    """A TOML table being read: remembers the path for messages and refuses keys it never read."""

    def __init__(self, file: Path, where: str, data: Any):
        if not isinstance(data, dict):
            raise RigFileError(file, where, f"must be a table, not {type(data).__name__}",
                               f"write it as [{where}] with keys under it")
        self.file, self.where, self.data = file, where, data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, problem: str, fix: str) -> RigFileError:
        return RigFileError(self.file, self.key(name), problem, fix)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False,
            fix: str = "") -> Any:
        self.seen.add(name)
        if name not in self.data:
            if required:
                raise self.missing(name, fix or f"add {name} = ... to [{self.where or 'top level'}]")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(name, f"must be {names}, not {value!r}", fix or f"give {name} a {names} value")
        _finite(self, name, value)
        return value

    def number(self, name: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
        """A finite number in [low, high] (``low_open``: above low)."""
        value = float(self.get(name, float, default))
        if value < low or (low_open and value == low) or value > high:
            side = ("positive" if low == 0 else f"above {low:g}") if low_open else f"at least {low:g}"
            raise self.fail(name, f"must be {side} and at most {high:g} ({value:g})",
                            f"use a number from {low:g} to {high:g}")
        return value

    def missing(self, name: str, fix: str) -> RigFileError:
        """A required key or table is absent: if a key nobody read is a near miss of it, name that one (a
        misspelt ``[consle]`` is a typo to fix, not a missing ``[console]``)."""
        for key in self.data:
            if key not in self.seen and difflib.get_close_matches(str(key), [name], n=1):
                return self.fail(str(key), "is not a known key", f"did you mean {name!r}?")
        return self.fail(name, "is missing", fix)

    def table(self, name: str, *, required: bool = False) -> _Table | None:
        self.seen.add(name)
        if name not in self.data:
            if required:
                raise self.missing(name, f"add a [{self.key(name)}] table")
            return None
        return _Table(self.file, self.key(name), self.data[name])

    def size(self, name: str, *, required: bool = False, default: int | None = None) -> int | None:
        value = self.get(name, (int, str), required=required)
        if value is None:
            return default
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.fail(name, str(e), "write a size such as 8GB or 512MiB") from None

    def positive(self, name: str, default: float, high: float = MAX_SECONDS) -> float:
        return self.number(name, default, low=0.0, high=high)

    def done(self) -> None:
        for name in self.data:
            if name not in self.seen:
                near = difflib.get_close_matches(name, sorted(self.seen), n=1)
                fix = f"did you mean {near[0]!r}?" if near else f"remove it; known keys: {', '.join(sorted(self.seen))}"
                raise self.fail(name, "is not a known key", fix)


def load_rig(path: str | os.PathLike[str], *, check_devices: bool = True) -> Rig:
    """Read and validate one rig file. ``check_devices=False`` skips checks against this machine."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RigFileError(file, "", "no such file", "check the path; rig files live in rigs/") from None
    except tomllib.TOMLDecodeError as e:
        raise RigFileError(file, "", f"is not valid TOML ({e})", "correct the syntax at that line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RigFileError(file, "", f"cannot be read ({e})", "make it a readable UTF-8 text file") from None
    return _parse(file, raw, check_devices)


def _parse(file: Path, raw: dict[str, Any], check_devices: bool) -> Rig:
    top = _Table(file, "", raw)
    name = top.get("name", str, file.stem)
    if not _RIG_NAME.match(name):
        raise top.fail("name", f"{name!r} is not a usable rig name", "use letters, digits, '-', '_' or '.'")
    model_name = top.get("model", str, required=True, fix=f"add model = one of {', '.join(MODELS)}")
    model = MODELS.get(model_name.lower())
    if model is None:
        near = difflib.get_close_matches(model_name.lower(), list(MODELS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise top.fail("model", f"unknown module model {model_name!r}", f"{hint}use one of {', '.join(MODELS)}")

    virtual_t = top.table("virtual")
    virtual = _virtual(virtual_t, name) if virtual_t else None

    emmc = top.table("emmc", required=True)
    assert emmc is not None
    emmc_size = emmc.size("size", required=True)
    assert emmc_size is not None
    emmc.done()
    if virtual is None and not emmc_size_plausible(model, emmc_size):
        sizes = ", ".join(f"{s // 1000**3}GB" for s in model.emmc_sizes)
        raise emmc.fail("size", f"{emmc_size} bytes is not an eMMC size of a {model.name} ({sizes})",
                        "set the size printed on the module")
    if virtual is not None and (emmc_size < 64 * 1024**2 or emmc_size % (1024 * 1024)):
        raise emmc.fail("size", f"{emmc_size} bytes is not usable for a virtual eMMC",
                        "use a whole number of MiB, at least 64MiB")
    for i, fault in enumerate(virtual.emmc.io_errors if virtual else ()):
        if fault.offset + fault.length > emmc_size:
            raise RigFileError(file, f"virtual.emmc.io_errors[{i}]", f"bytes {fault.offset}-"
                               f"{fault.offset + fault.length} lie beyond the {emmc_size}-byte eMMC",
                               "give an offset and length inside [emmc] size")
    if virtual is not None and virtual.boot_engine == "qemu":
        if model.chip != "bcm2837":
            raise RigFileError(file, "virtual.boot_engine", f"QEMU boots only a cm3 or cm3+ (its raspi3b machine is "
                               f"their BCM2837), not a {model.name}", 'set boot_engine = "model" or model = "cm3"')
        if emmc_size & (emmc_size - 1):
            raise emmc.fail("size", f"{emmc_size} bytes is not a power of two, which QEMU needs for the SD card that "
                            "stands in for the eMMC", 'use a power of two, e.g. "512MiB" or "1GiB"')

    power = _power(top.table("power"))
    relays = _relays(top.table("relays", required=True), virtual is not None,  # type: ignore[arg-type]
                     power.backend == "relay")
    usb = top.table("usb", required=True)
    assert usb is not None
    ports = _ports(usb)
    for port in virtual.controllers if virtual else ():
        if port not in ports:
            raise RigFileError(file, f"virtual.usb.controllers.{port}", f"names port {port}, which [usb] does not list",
                               f"add it to [usb] ports or use one of {', '.join(ports)}")
    payload_s = usb.get("payload", str)
    payload = (file.parent / payload_s).resolve() if payload_s else None
    usb_boot = _usb_boot(usb)
    usb_select = _usb_select(usb, ports)
    usb.done()

    console = _console(top.table("console", required=True), name, virtual is not None, check_devices)  # type: ignore[arg-type]
    timeouts = dict(DEFAULT_TIMEOUTS)
    t = top.table("timeouts")
    if t:
        for key in t.data:
            if key not in DEFAULT_TIMEOUTS:
                t.seen.add(key)
                near = difflib.get_close_matches(key, list(DEFAULT_TIMEOUTS), n=1)
                raise t.fail(key, "is not a known stage", f"did you mean {near[0]!r}?" if near
                             else f"use one of {', '.join(DEFAULT_TIMEOUTS)}")
            timeouts[key] = t.number(key, 0.0, low=0.0, low_open=True, high=MAX_SECONDS)
    markers = dict(DEFAULT_MARKERS)
    forbidden = DEFAULT_FORBIDDEN
    b = top.table("boot")
    if b:
        m = b.table("markers")
        if m:
            _check_marker_names(m)
            for key in m.data:
                markers[key] = _regex(m, key)
        extra_forbidden = b.get("forbidden", list, [])
        for i, pattern in enumerate(extra_forbidden):
            if not isinstance(pattern, str):
                raise b.fail(f"forbidden[{i}]", "must be a string", "write each pattern as a quoted regex")
            _regex_check(b, f"forbidden[{i}]", pattern)
        forbidden = forbidden + tuple(extra_forbidden)
        b.done()
    customise = _customise(top.table("customise"), model)
    lab_t = top.table("lab")
    lab = _lab(lab_t, name) if lab_t else Lab(place=name)
    top.done()
    return Rig(name=name, path=file, model=model, emmc_size=emmc_size, relays=relays, usb_ports=ports,
               payload=payload, console=console, timeouts=timeouts, markers=markers, forbidden=forbidden,
               virtual=virtual, power=power, customise=customise, usb_boot=usb_boot, usb_select=usb_select,
               lab=lab)


def _lab(t: _Table, rig_name: str) -> Lab:
    from hil.lab.coordinator import check_address

    lock = t.get("lock", str, "local")
    if lock not in LOCK_BACKENDS:
        raise t.fail("lock", f"unknown lock backend {lock!r}", f"use one of {', '.join(LOCK_BACKENDS)}")
    allow = t.get("allow_remote_coordinator", bool, False)
    coordinator = t.get("coordinator", str, "127.0.0.1:20408")
    coordinator, problem, fix = check_address(coordinator, allow_remote=allow)
    if problem:
        raise t.fail("coordinator", problem, fix)
    place = t.get("place", str, rig_name)
    if not _RIG_NAME.match(place):
        raise t.fail("place", f"{place!r} is not a usable place name", "use letters, digits, '-', '_' or '.'")
    site = t.get("site", str, "")
    tags: dict[str, str] = {}
    sub = t.table("tags")
    for key in sub.data if sub else ():
        assert sub is not None
        value = sub.get(key, str, fix=f'write {key} = "value"')
        if not _TAG_KEY.match(key):
            raise sub.fail(key, "is not a labgrid tag key", "use lowercase letters, digits and '_', starting with "
                           "a letter, at least two characters")
        tags[key] = value
    t.done()
    return Lab(lock, coordinator, place, site, tags, allow)


#: Markers the framework itself reads besides DEFAULT_MARKERS (hil.control.bootconfirm.BUILD_ID_MARKER).
KNOWN_EXTRA_MARKERS = ("build_id",)


def _check_marker_names(t: _Table) -> None:
    """A marker of one's own is fine; a name one typo away from a known one (``kernal``) would silently add a
    marker and leave the real one at its default, so it is refused with a "did you mean"."""
    known = [*DEFAULT_MARKERS, *KNOWN_EXTRA_MARKERS]
    for key in t.data:
        near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        if key not in known and near:
            raise t.fail(str(key), "is not a known marker", f"did you mean {near[0]!r}? (a marker of your own needs "
                         "a name unlike the built-in ones)")


def _regex(t: _Table, key: str) -> str:
    value = t.get(key, str)
    _regex_check(t, key, value)
    return str(value)


def _regex_check(t: _Table, key: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise t.fail(key, f"{value!r} is not a valid regular expression ({e})", "escape special characters") from None


def _power(t: _Table | None) -> Power:
    if t is None:
        return Power()
    backend = t.get("backend", str, "relay")
    if backend not in POWER_BACKENDS:
        raise t.fail("backend", f"unknown power backend {backend!r}", f"use one of {', '.join(POWER_BACKENDS)}")
    power = Power(backend)
    if backend == "uhubctl":
        hub = t.get("hub", str, required=True, fix='add hub = "1-1" (the hub\'s location as uhubctl -l takes it)')
        if not UsbPort.valid(hub) and not hub.isdigit():
            raise t.fail("hub", f"{hub!r} is not a hub location", 'write it as uhubctl lists it, e.g. "1-1"')
        port = t.get("port", int, required=True, fix="add port = N (the hub port the module's supply is on)")
        if not 1 <= port <= 255:
            raise t.fail("port", f"{port} is not a hub port number", "use the port number uhubctl shows")
        power = Power(backend, hub=hub, port=port, program=t.get("program", str, "uhubctl"))
    elif backend == "command":
        on, off = _argv(t, "on", required=True), _argv(t, "off", required=True)
        power = Power(backend, on=on, off=off, status=_argv(t, "status", required=False))
    t.done()
    return power


def _argv(t: _Table, name: str, *, required: bool) -> tuple[str, ...]:
    """A command as a list of arguments, or a string split as a shell would (without running one)."""
    value = t.get(name, (str, list), required=required,
                  fix=f'add {name} = ["program", "arg", ...] to [{t.where}]')
    if value is None:
        return ()
    try:
        argv = shlex.split(value) if isinstance(value, str) else list(value)
    except ValueError as e:
        raise t.fail(name, f"cannot be split into arguments ({e})", "close the quotes") from None
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise t.fail(name, "must name a program and its arguments as strings", f'write {name} = ["program", "arg"]')
    return tuple(argv)


def _relays(t: _Table, virtual: bool, power_relay: bool = True) -> Relays:
    factory = t.get("pin_factory", str, "mock" if virtual else "lgpio")
    if factory not in PIN_FACTORIES:
        raise t.fail("pin_factory", f"unknown pin factory {factory!r}", f"use one of {', '.join(PIN_FACTORIES)}")
    if virtual and factory != "mock":
        raise t.fail("pin_factory", "a virtual rig's relays are gpiozero mock pins",
                     'set pin_factory = "mock" or remove [virtual]')
    used: dict[int, str] = {}
    lines: dict[str, RelayLine | None] = {}
    for role in ("power", "nrpi_boot", "eeprom_nwp"):
        sub = t.table(role)
        if sub is None:
            lines[role] = None
            continue
        gpio = sub.get("gpio", int, required=True, fix=f"add gpio = N (BCM numbering) to [{sub.where}]")
        if not 0 <= gpio <= 53:
            raise sub.fail("gpio", f"GPIO {gpio} does not exist", "use a BCM GPIO number from 0 to 53")
        if gpio in used:
            raise sub.fail("gpio", f"GPIO {gpio} is already used by relays.{used[gpio]}",
                           "give every relay line its own GPIO")
        used[gpio] = role
        line_factory = sub.get("pin_factory", str, factory)
        if line_factory not in PIN_FACTORIES:
            raise sub.fail("pin_factory", f"unknown pin factory {line_factory!r}",
                           f"use one of {', '.join(PIN_FACTORIES)}")
        lines[role] = RelayLine(role, gpio, sub.get("active_high", bool, True), line_factory, _rest(sub, "rest"))
        sub.done()
    if lines["power"] is not None and not power_relay:
        raise t.fail("power", "is set, but [power] switches the module's supply another way",
                     "remove [relays.power] or set [power] backend = \"relay\"")
    if lines["power"] is None and power_relay:
        raise t.missing("power", "add [relays.power] with the GPIO that switches the module's power")
    off_time = t.positive("off_time", 0.5 if virtual else 2.0)
    protect = t.get("nwp_protect_at_rest", bool, False)
    if protect and lines["eeprom_nwp"] is None:
        raise t.fail("nwp_protect_at_rest", "is set but EEPROM_nWP is not wired",
                     "add [relays.eeprom_nwp] or remove nwp_protect_at_rest")
    t.done()
    return Relays(lines["power"], lines["nrpi_boot"], lines["eeprom_nwp"], off_time, protect)


def _rest(t: _Table, key: str) -> bool:
    """A relay's state at rest, "off" or "on": True when it is energised with its GPIO not driven."""
    value = t.get(key, str, "off")
    if value not in ("off", "on"):
        raise t.fail(key, f"{value!r} is not a relay state", f'write {key} = "off" (de-energised when no process '
                     'drives the GPIO) or "on"')
    return value == "on"


def _virtual_relays(t: _Table | None) -> dict[str, bool]:
    """``[virtual.relays]``: how the virtual relay board's pulls really rest, per line (default: as declared)."""
    if t is None:
        return {}
    found = {}
    for role in t.data:
        if role not in ("power", "nrpi_boot", "eeprom_nwp"):
            t.seen.add(role)
            raise t.fail(role, "is not a relay line", "use power, nrpi_boot or eeprom_nwp")
        found[role] = _rest(t, role)
    t.done()
    return found


def _ports(t: _Table) -> tuple[UsbPort, ...]:
    port = t.get("port", str)
    ports = t.get("ports", list)
    if port is None and not ports:
        raise t.missing("port", 'add port = "BUS-PORT[.PORT...]" (the module\'s USB slave port, e.g. 1-1.3)')
    if port is not None and ports:
        raise t.fail("ports", "port and ports are both set", "list every port in ports, or use port alone")
    all_ports = [port] if port is not None else list(ports)
    for p in all_ports:
        if not UsbPort.valid(p):
            raise t.fail("port", f"{p!r} is not a USB port path",
                         f"write it as lsusb -t / sysfs shows it: BUS-PORT[.PORT...] (at most {MAX_DEPTH} ports), "
                         "e.g. 1-1.3")
    parsed = tuple(UsbPort(p) for p in all_ports)
    if len(set(parsed)) != len(parsed):
        raise t.fail("ports", "lists a port twice", "list each port once")
    return parsed


def _usb_boot(t: _Table) -> UsbBootOptions:
    retries = t.get("rom_retries", int, UsbBootOptions.rom_retries)
    if not 0 <= retries <= 20:
        raise t.fail("rom_retries", f"{retries} is not a usable number of ROM retries",
                     "use 0 (fail on the first failed exchange) to 20; the default is 2")
    disk = t.get("disk", str, "emmc")
    if disk not in ("emmc", "nvme"):
        raise t.fail("disk", f"{disk!r} is not a disk of a Compute Module", 'write disk = "emmc" (default) or "nvme"')
    return UsbBootOptions(retries, t.get("signed_boot", bool, False), disk)


def _usb_select(t: _Table, ports: tuple[UsbPort, ...]) -> dict[UsbPort, tuple[str, ...]]:
    """``[usb.select]``: ``"PORT" = ["program", "arg", ...]`` for ports of ``[usb] ports``."""
    select = t.table("select")
    if select is None:
        return {}
    found: dict[UsbPort, tuple[str, ...]] = {}
    for port in select.data:
        if port not in ports:
            select.seen.add(port)
            raise select.fail(port, f"names port {port}, which [usb] ports does not list",
                              f"use one of {', '.join(ports)}")
        found[UsbPort(port)] = _argv(select, port, required=True)
    select.done()
    return found


def _console(t: _Table, rig_name: str, virtual: bool, check_devices: bool) -> Console:
    baud = t.get("baud", int, 115200)
    if not 0 < baud <= 16_000_000:
        raise t.fail("baud", f"{baud} is not a baud rate", "use the console's rate, usually 115200")
    device = t.get("device", str)
    t.done()
    if virtual:
        if device is not None:
            raise t.fail("device", "a virtual rig makes its own console",
                         "remove device; the virtual console appears under the runtime directory")
        return Console(str(runtime_dir() / rig_name / "console"), baud, virtual=True)
    if device is None:
        raise t.missing("device", 'add device = "/dev/serial/by-id/..." or a pyserial URL')
    if check_devices and "://" not in device and not Path(device).exists():
        raise t.fail("device", f"{device} does not exist",
                     "plug in the USB-serial adapter or use its /dev/serial/by-id/ path")
    return Console(device, baud)


_SYSTEM_FOLDERS = (Path("/dev"), Path("/proc"), Path("/sys"), Path("/boot"), Path("/etc"), Path("/usr"))


def _check_state_dir(t: _Table, state_dir: Path) -> None:
    """The virtual eMMC and EEPROM files go there: never the root or a system folder (``/dev`` was accepted)."""
    real = Path(os.path.realpath(state_dir))
    if real == Path("/") or any(real == f or f in real.parents for f in _SYSTEM_FOLDERS):
        raise t.fail("state_dir", f"{state_dir} is a system folder", "use a folder of your own, e.g. "
                     "~/.cache/cm-hil/virtual/RIG, or remove state_dir")


def default_state_root() -> Path:
    """Where virtual rigs keep their eMMC and EEPROM files unless a rig file says ``state_dir``."""
    return Path(os.environ.get("HIL_STATE_DIR") or Path.home() / ".cache" / "cm-hil" / "virtual")


def _virtual(t: _Table, rig_name: str) -> Virtual:
    speedup = t.number("speedup", 1.0, low=0.0, low_open=True, high=1000.0)
    boot_engine = t.get("boot_engine", str, "model")
    if boot_engine not in ("model", "qemu"):
        raise t.fail("boot_engine", f"unknown boot engine {boot_engine!r}",
                     'use "model" (the simulated boot) or "qemu" (a real kernel under QEMU)')
    transport = t.get("transport", str, "umockdev")
    if transport not in TRANSPORTS:
        raise t.fail("transport", f"unknown USB transport {transport!r}",
                     'use "umockdev" (the default) or "kernel" (a QEMU guest with the Linux USB stack)')
    state = t.get("state_dir", str)
    state_dir = Path(state).expanduser() if state else default_state_root() / rig_name
    _check_state_dir(t, state_dir)
    e = t.table("emmc")
    write_bps = read_bps = 35e6
    errors: list[EmmcFault] = []
    loop = True
    if e:
        write_bps = e.positive("write_mbps", 35.0, high=100000.0) * 1e6
        read_bps = e.positive("read_mbps", 35.0, high=100000.0) * 1e6
        loop = e.get("loop_device", bool, True)
        for i, item in enumerate(e.get("io_errors", list, [])):
            sub = _Table(e.file, f"{e.key('io_errors')}[{i}]", item)
            offset = sub.size("offset", required=True)
            length = sub.size("length", default=4096)
            op = sub.get("op", str, "both")
            if op not in ("read", "write", "both"):
                raise sub.fail("op", f"{op!r} is not read, write or both", 'use op = "read", "write" or "both"')
            sub.done()
            assert offset is not None and length is not None
            errors.append(EmmcFault(offset, length, op))
        e.done()
    usb = t.table("usb")
    usb_data = dict(usb.data) if usb else {}
    controllers: dict[UsbPort, str] = {}
    if usb:
        c = usb.table("controllers")
        controllers = _controllers(c) if c else {}
        usb_data.pop("controllers", None)
        usb.seen.update(usb.data)
    console = t.table("console")
    console_data = dict(console.data) if console else {}
    if console:
        console.seen.update(console.data)
    relay_rest = _virtual_relays(t.table("relays"))
    t.done()
    return Virtual(speedup, state_dir, VirtualEmmc(write_bps, read_bps, tuple(errors), loop), usb_data, console_data,
                   controllers, boot_engine, relay_rest, transport)


def _controllers(t: _Table) -> dict[UsbPort, str]:
    """``"PORT" = "KIND-PROFILE"``; which kinds and profiles exist is the virtual bus's to say."""
    found: dict[UsbPort, str] = {}
    for port in t.data:
        value = t.get(port, str, fix=f'write "{port}" = "xhci-lenient" (or "ehci-hypothesis-maxpacket", ...)')
        if not UsbPort.valid(port):
            raise t.fail(port, f"{port!r} is not a USB port path", 'quote a port of [usb] ports, e.g. "15-1"')
        if not re.match(r"^[a-z]+(-[a-z]+)*$", value):
            raise t.fail(port, f"{value!r} is not a controller",
                         'write KIND-PROFILE, e.g. "xhci-lenient" or "ehci-hypothesis-maxpacket"')
        found[UsbPort(port)] = value
    return found


_USER = re.compile(r"^[a-z][a-z0-9-]{0,30}$")  # Raspberry Pi's rule for userconf.txt names
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
UARTS = {"cm5": ("uart10", "uart0")}


def _customise(t: _Table | None, model: ModuleModel) -> Customise:
    if t is None:
        return Customise(uart=UARTS.get(model.name, ("",))[0])
    user = t.get("user", str, "hil")
    if not _USER.match(user) or user == "root":
        raise t.fail("user", f"{user!r} is not a user Raspberry Pi OS can create",
                     "use lower-case letters, digits and hyphens, starting with a letter, at most 31, not root")
    env = t.get("password_env", str, "HIL_LOGIN_PASSWORD")
    if not _ENV_NAME.match(env):
        raise t.fail("password_env", f"{env!r} is not an environment variable name", 'e.g. "HIL_LOGIN_PASSWORD"')
    if "password" in t.data:
        t.seen.add("password")
        raise t.fail("password", "a password must not be written in a rig file",
                     "put it in the environment variable password_env names, or in a file that password_file names")
    file_s = t.get("password_file", str)
    uarts = UARTS.get(model.name, ("",))
    uart = t.get("uart", str, uarts[0])
    if uart not in uarts:
        raise t.fail("uart", f"a {model.name} has no console choice {uart!r}",
                     f"use one of {', '.join(repr(u) for u in uarts)}" if uarts[0] else "remove uart")
    bootloader_uart = t.get("bootloader_uart", bool, False)
    if bootloader_uart and not model.has_eeprom:
        raise t.fail("bootloader_uart", f"a {model.name} has no EEPROM bootloader", "remove bootloader_uart")
    out = Customise(t.get("enabled", bool, True), user, env,
                    # made absolute without resolving: a symlink must be seen, and refused, where it is read
                    Path(os.path.abspath(t.file.parent / Path(file_s).expanduser())) if file_s else None,
                    t.get("ssh", bool, False), uart,
                    bootloader_uart)
    t.done()
    return out


def describe(rig: Rig) -> str:
    """The resolved rig as a person reads it (``hil rig check``)."""
    r = rig.relays
    lines = [
        f"rig        {rig.name}  ({rig.path})",
        f"model      {rig.model.name} ({rig.model.chip}, boot ROM 0a5c:{rig.model.rom_pid:04x})",
        f"eMMC       {rig.emmc_size} bytes ({rig.emmc_size / 1024**3:.2f} GiB)",
        f"USB port   {', '.join(rig.usb_ports)}" + (f"  payload {rig.payload}" if rig.payload else ""),
        f"USB boot   {rig.usb_boot.rom_retries} ROM retries" + (", signed" if rig.usb_boot.signed else "")
        + f", writes the {rig.usb_boot.disk}",
        *(f"USB select {port}: {shlex.join(argv)}" for port, argv in rig.usb_select.items()),
        f"console    {rig.console.device} @ {rig.console.baud}" + ("  (virtual pty)" if rig.console.virtual else ""),
    ]
    if rig.power.backend == "uhubctl":
        lines.append(f"power      uhubctl hub {rig.power.hub} port {rig.power.port} ({rig.power.program})")
    elif rig.power.backend == "command":
        lines.append(f"power      commands: on {shlex.join(rig.power.on)}; off {shlex.join(rig.power.off)}"
                     + (f"; status {shlex.join(rig.power.status)}" if rig.power.status else ""))
    for line in r.lines():
        lines.append(f"relay      {line.role:<10} GPIO{line.gpio:<3} active-{'high' if line.active_high else 'low'}"
                     f"  pin factory {line.pin_factory}  at rest {'on' if line.rest_on else 'off'}")
    rest = "protected (low)" if r.nwp_protect_at_rest else "released"
    lines.append(f"off time   {r.off_time} s; EEPROM_nWP at rest: {rest}")
    lines.append("timeouts   " + ", ".join(f"{k}={v:g}s" for k, v in rig.timeouts.items()))
    lines.append("markers    " + ", ".join(f"{k}={v!r}" for k, v in rig.markers.items()))
    if rig.virtual:
        v = rig.virtual
        lines.append(f"virtual    speed-up x{v.speedup:g}, state in {v.state_dir}")
        if v.boot_engine != "model":
            lines.append(f"           eMMC boot under {v.boot_engine}")
        lines.append(f"           eMMC write {_rate(v.emmc.write_bps)}, read {_rate(v.emmc.read_bps)}, "
                     f"{len(v.emmc.io_errors)} injected I/O error(s)")
        if v.usb:
            lines.append(f"           USB {dict(v.usb)}")
        if v.controllers:
            lines.append("           controllers " + ", ".join(f"{p}: {c}" for p, c in v.controllers.items()))
        if v.console:
            lines.append(f"           console {dict(v.console)}")
    return "\n".join(lines)


def _rate(bps: float) -> str:
    return "unlimited" if not bps else f"{bps / 1e6:g} MB/s"
