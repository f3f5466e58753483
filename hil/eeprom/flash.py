"""Flash a CM4/CM5 bootloader EEPROM through USB boot and prove it took, from evidence rather than silence.

The flow (usbboot-protocol.md section 7):

1. Check the recovery payload on the host: its second stage, a pieeprom image of the right size with a
   valid boot.conf inside, a pieeprom.sig that matches it, a usable config.txt. Any problem is the user's
   (:class:`InputError`) and nothing has been sent to the module.
2. Power off, release EEPROM_nWP (the status register's protection only bites while it is low), assert
   nRPI_BOOT, power on and run the recovery payload with the usbboot host.
3. Judge from recovery.bin's metadata: ``EEPROM_UPDATE`` must be ``success`` and ``EEPROM_HASH`` the SHA-256
   in pieeprom.sig. A green screen or a quiet exit proves nothing (rpi-eeprom#735).
4. Power off, which puts nRPI_BOOT and EEPROM_nWP back to the rig's resting levels.
5. With ``eeprom_write_protect`` in config.txt, check its effect: one more recovery run with EEPROM_nWP
   low writing the same image must be refused (``1``) or accepted (``0``). The image is identical, so the
   check is harmless either way.
6. Power-cycle into the eMMC and read the bootloader's UART banner: its build (VERSION, BUILD_TIMESTAMP) and
   the BOOT_ORDER it walks (the first ``Boot mode:`` line names the first mode and the rest of the order)
   must be the flashed ones. With BOOT_UART=0 (usbboot's stock recovery boot.conf) the bootloader prints
   nothing, so there is no banner to expect and step 3 alone proves the update.

A module whose update was cut short holds a torn image: its boot ROM finds no bootloader, prints nothing
and waits as a USB device, where this same flow recovers it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hil.control.bootmode import find_rom
from hil.control.lifecycle import Lifecycle
from hil.eeprom.bootconf import BootConf, parse_bootconf
from hil.eeprom.pieeprom import ImageFacts, check_size, image_facts, read_config
from hil.eeprom.sig import Sig, check_sig, read_sig
from hil.errors import HilError, InfrastructureError, InputError, ProductError, StageTimeout
from hil.models import ModuleModel
from hil.rig import Rig
from hil.usbboot.fileserver import Payload
from hil.usbboot.host import UsbBoot, UsbBootResult

STAGE = "eeprom"
IMAGE_NAMES = ("pieeprom.upd", "pieeprom.bin")  # in the order recovery.bin asks for them
_BANNER = r"RPi: BOOTLOADER release VERSION:([0-9a-f]+) DATE: (.+?)\s*$"
_TIMESTAMP = r"BUILD_TIMESTAMP=(\d+)"
_FIRST_MODE = r"Boot mode: \S+ \(([0-9a-f]{2})\) order ([0-9a-f]+)"


@dataclass(frozen=True)
class RecoveryPayload:
    """A recovery folder, checked: what will be sent, and what it should leave on the module."""

    folder: Path
    image_name: str
    image: bytes
    sig: Sig
    config: BootConf
    facts: ImageFacts
    write_protect: str | None  # eeprom_write_protect from config.txt: "1", "0", or None (leave as is)
    config_txt: str
    config_txt_source: str


@dataclass(frozen=True)
class Banner:
    """What the bootloader says about itself on the UART after a power-on."""

    version: str
    date: str
    build_timestamp: int
    boot_order: int


@dataclass
class EepromUpdate:
    rig: str
    model: str
    payload: str
    image: str
    sha256: str
    boot_order: str
    write_protect: str | None
    metadata: dict[str, str]
    protection: str = "not requested"  # what the eeprom_write_protect check found
    banner: Banner | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_payload(folder: Path, rig: Rig) -> RecoveryPayload:
    """Everything about the payload that can be wrong, found before the module is touched.

    A boot.conf with BOOT_UART=0 (usbboot's stock recovery folder) is accepted: the update is then proven by
    recovery.bin's metadata alone, as the bootloader prints no banner to read back."""
    model = rig.model
    if not model.has_eeprom:
        raise InputError(f"rig {rig.name} is a {model.name}, which has no bootloader EEPROM. Fix: use a cm4 or cm5 "
                         "rig", stage=f"{STAGE}.payload")
    payload = Payload(Path(folder), model)
    payload.second_stage()  # recovery.bin as bootcode4.bin / bootcode5.bin
    found = next(((name, f) for name in IMAGE_NAMES if (f := payload.find(name)) is not None), None)
    if found is None:
        raise InputError(f"{folder} has no pieeprom.bin (or pieeprom.upd). Fix: build one with `hil eeprom build` "
                         "(usbboot: update-pieeprom.sh)", stage=f"{STAGE}.payload", folder=str(folder))
    name, image_file = found
    image = image_file.data
    check_size(image, model, image_file.source)
    config = parse_bootconf(read_config(image, model, image_file.source), model.name,
                            f"{image_file.source}:bootconf.txt")
    sig_file = payload.find("pieeprom.sig")
    sig = read_sig(Path(sig_file.source) if sig_file else Path(folder) / "pieeprom.sig")
    check_sig(image, sig, image_file.source, sig_file.source if sig_file else "pieeprom.sig")
    config_file = payload.find("config.txt")
    config_txt = config_file.data.decode("ascii", "replace") if config_file else ""
    settings = _settings(config_txt)
    where = config_file.source if config_file else f"{folder}/config.txt"
    if settings.get("recovery_metadata") == "0":
        raise InputError(f"{where} sets recovery_metadata=0, so recovery.bin would not report EEPROM_UPDATE and "
                         "EEPROM_HASH and the update could not be proven. Fix: remove that line",
                         stage=f"{STAGE}.payload")
    write_protect = settings.get("eeprom_write_protect")
    if write_protect not in (None, "-1", "0", "1"):
        raise InputError(f"{where}: eeprom_write_protect={write_protect} means nothing. Fix: use 1 (protect), "
                         "0 (clear) or -1 (leave as is)", stage=f"{STAGE}.payload")
    facts = image_facts(image)
    if facts.stand_in and not rig.is_virtual:
        raise InputError(f"{image_file.source} is a cm-hil stand-in image; it would brick a real {model.name}. Fix: "
                         "build pieeprom.bin from a Raspberry Pi release image", stage=f"{STAGE}.payload")
    return RecoveryPayload(Path(folder), name, image, sig, config, facts,
                           None if write_protect == "-1" else write_protect, config_txt,
                           config_file.source if config_file else "")


def flash_eeprom(lc: Lifecycle, folder: Path, *, keep_write_protect: bool = False, confirm: bool = True,
                 **usb_options: Any) -> EepromUpdate:
    """Write the recovery payload in ``folder`` to the rig's EEPROM and prove it (see the module docstring).

    ``keep_write_protect`` leaves EEPROM_nWP pulled low during the update (to rehearse a protected module);
    ``usb_options`` go to :class:`UsbBoot` (e.g. ``settle``)."""
    started = time.monotonic()
    rig = lc.rig
    payload = check_payload(folder, rig)
    result = EepromUpdate(rig.name, rig.model.name, str(folder), payload.image_name, payload.sig.sha256,
                          f"0x{payload.config.boot_order.value:x}", payload.write_protect, {})
    usb = recovery_boot(lc, folder, write_protect=keep_write_protect, **usb_options)
    result.metadata = dict(usb.metadata)
    judge_update(usb, payload, write_protected=keep_write_protect)
    if payload.write_protect is not None:
        result.protection = _check_protection(lc, payload, usb_options)
        if payload.write_protect == "1" and not rig.relays.nwp_protect_at_rest:
            result.notes.append(f"the EEPROM's protect bits are set, but EEPROM_nWP rests released on rig {rig.name}"
                                f", so it is writable at rest: set nwp_protect_at_rest = true in {rig.path}")
    if confirm and not payload.config.boot_uart:
        result.notes.append("the new boot.conf leaves BOOT_UART off, so the bootloader prints no banner: the "
                            "update is proven by recovery.bin's EEPROM_UPDATE and EEPROM_HASH only")
    elif confirm:
        result.banner = read_banner(lc)
        _confirm(result.banner, payload)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def recovery_boot(lc: Lifecycle, folder: Path, *, write_protect: bool = False, **usb_options: Any) -> UsbBootResult:
    """One USB boot into ``folder`` with EEPROM_nWP released (or held low), then powered off again."""
    wired = lc.bootmode.write_protected is not None
    try:
        lc.usb_boot(write_protect=write_protect if write_protect or wired else None)
        usb_options.setdefault("backend", lc.usb_backend)
        return UsbBoot.for_rig(lc.rig, folder, **usb_options).run()
    finally:
        lc.off()  # power, then nRPI_BOOT and EEPROM_nWP back to rest


def judge_update(usb: UsbBootResult, payload: RecoveryPayload, *, write_protected: bool) -> None:
    """Success only when recovery.bin said so and its EEPROM hash is the one pieeprom.sig names."""
    metadata = usb.metadata
    stage = f"{STAGE}.update"
    update = metadata.get("EEPROM_UPDATE")
    done = any(s.name == "file_server" and s.ok and s.detail == "done" for s in usb.stages)
    evidence: dict[str, Any] = {"metadata": dict(metadata), "port": usb.port}
    if update is None and not done:
        raise InfrastructureError(
            f"the module left USB port {usb.port} before recovery.bin reported EEPROM_UPDATE: power or the cable "
            "went during the update. The EEPROM may be half-written; such a module prints nothing and waits on "
            "USB. Fix: check the supply and the cable, then flash again (USB boot always reaches recovery.bin)",
            stage=stage, **evidence)
    if update is None:
        asked = ", ".join(f.name for f in usb.files_served) or "nothing"
        raise ProductError(f"recovery.bin finished without EEPROM_UPDATE (it asked for {asked}): it did not take "
                           f"{payload.image_name}. Fix: use the recovery.bin of a current usbboot release",
                           stage=stage, **evidence)
    if update != "success":
        if write_protected:
            raise InfrastructureError(
                f"recovery.bin reported EEPROM_UPDATE={update}: the EEPROM is write-protected (its protect bits are "
                "set and EEPROM_nWP was held low). Fix: release EEPROM_nWP for the update", stage=stage, **evidence)
        raise ProductError(f"recovery.bin reported EEPROM_UPDATE={update} with EEPROM_nWP released: the EEPROM did "
                           "not take a verified image (a carrier holding /WP low, or a failing flash chip)",
                           stage=stage, **evidence)
    got = metadata.get("EEPROM_HASH", "").lower()
    if got != payload.sig.sha256:
        raise ProductError(f"recovery.bin reported success, but EEPROM_HASH {got or '(none)'} is not the sha256 of "
                           f"{payload.image_name} ({payload.sig.sha256}): the EEPROM holds something else",
                           stage=stage, **evidence)


def read_banner(lc: Lifecycle) -> Banner:
    """Power on into the eMMC, read what the bootloader prints about itself, power off."""
    rig = lc.rig
    console = lc.console  # open before power-on: nothing printed is missed
    lc.off()
    lc.power.wait_discharged()  # the last boot's output has stopped: what follows is this boot's
    console.skip_pending()
    timeout = rig.timeouts["bootloader"]
    lc.power_on()
    try:
        deadline = time.monotonic() + timeout
        found = []
        for pattern, what in ((_BANNER, "bootloader banner"), (_TIMESTAMP, "BUILD_TIMESTAMP"),
                              (_FIRST_MODE, "first 'Boot mode:' line")):
            try:
                found.append(console.expect(pattern, max(0.0, deadline - time.monotonic()),
                                            stage=f"{STAGE}.confirm", what=what))
            except StageTimeout as e:
                raise _silence(e, lc, timeout) from None
    finally:
        lc.off()
    banner, stamp, mode = found
    first, rest = int(mode.group(1), 16), int(mode.group(2), 16)
    return Banner(banner.group(1), banner.group(2), int(stamp.group(1)), rest << 4 | first if rest else first)


def _silence(e: StageTimeout, lc: Lifecycle, timeout: float) -> HilError:
    rig = lc.rig
    if lc.console.received:
        return ProductError(f"{e.message}\nthe module printed something, but not the bootloader's report",
                            stage=e.stage, **e.evidence)
    try:
        rom = find_rom(rig, lc.usb_backend)
    except Exception:  # no libusb or the port cannot be read: no evidence either way
        rom = None
    if rom is not None:
        return ProductError(f"no bootloader output within {timeout:g} s and the boot ROM waits on USB port "
                            f"{rig.usb_port}: the EEPROM holds no valid bootloader (an interrupted update?). Fix: "
                            "flash it again with `hil eeprom flash`", stage=e.stage, **e.evidence)
    return InfrastructureError(f"nothing at all arrived on the console {lc.console.device} within {timeout:g} s of "
                               "power-on. Fix: check the USB-serial adapter and its wiring; if the console is fine, "
                               "the EEPROM may hold no bootloader: flash it again", stage=e.stage, **e.evidence)


def _confirm(banner: Banner, payload: RecoveryPayload) -> None:
    facts, order = payload.facts, payload.config.boot_order.value
    wrong = []
    if facts.version is not None and banner.version != facts.version:
        wrong.append(f"VERSION {banner.version}, not {facts.version}")
    if facts.build_timestamp is not None and banner.build_timestamp != facts.build_timestamp:
        wrong.append(f"BUILD_TIMESTAMP {banner.build_timestamp}, not {facts.build_timestamp}")
    if banner.boot_order != order:
        wrong.append(f"BOOT_ORDER 0x{banner.boot_order:x}, not 0x{order:x}")
    if wrong:
        raise ProductError(f"after the update the bootloader runs {'; '.join(wrong)} (as flashed): the module did not "
                           "take the new EEPROM image, or boots another one", stage=f"{STAGE}.confirm",
                           banner=asdict(banner))


def _check_protection(lc: Lifecycle, payload: RecoveryPayload, usb_options: dict[str, Any]) -> str:
    """Write the same image again with EEPROM_nWP low: refused when protected, accepted when cleared."""
    rig = lc.rig
    if lc.bootmode.write_protected is None:
        return f"not checked: rig {rig.name} has no EEPROM_nWP relay"
    want_refused = payload.write_protect == "1"
    with tempfile.TemporaryDirectory(prefix="hil-eeprom-probe-") as tmp:
        probe = Path(tmp) / "payload"
        shutil.copytree(payload.folder, probe, ignore_dangling_symlinks=True)
        config = "\n".join(line for line in payload.config_txt.splitlines()
                           if not line.strip().startswith("eeprom_write_protect"))
        source = Path(payload.config_txt_source) if payload.config_txt_source else payload.folder / "config.txt"
        target = probe / source.relative_to(payload.folder) if source.is_relative_to(payload.folder) else \
            probe / "config.txt"
        target.write_text(config + "\n")
        usb = recovery_boot(lc, probe, write_protect=True, **usb_options)
    update = usb.metadata.get("EEPROM_UPDATE")
    if want_refused and update == "success":
        raise ProductError("eeprom_write_protect=1 did not protect the EEPROM: a write with EEPROM_nWP low went "
                           "through. Fix: check that the carrier routes EEPROM_nWP to the module",
                           stage=f"{STAGE}.protect", metadata=dict(usb.metadata))
    if not want_refused and update != "success":
        raise ProductError(f"eeprom_write_protect=0 did not clear the protection: a write with EEPROM_nWP low ended "
                           f"{update or 'without EEPROM_UPDATE'}", stage=f"{STAGE}.protect",
                           metadata=dict(usb.metadata))
    return "verified: a write with EEPROM_nWP low was " + ("refused" if want_refused else "accepted")


def show_image(image: bytes, model: ModuleModel, source: object) -> tuple[ImageFacts, BootConf]:
    """An image's build and boot.conf, validated (``hil eeprom show --image``)."""
    check_size(image, model, source)
    return image_facts(image), parse_bootconf(read_config(image, model, source), model.name, f"{source}:bootconf.txt")


def _settings(config: str) -> dict[str, str]:
    out = {}
    for line in config.splitlines():
        line = line.split("#", 1)[0].strip()
        key, sep, value = line.partition("=")
        if sep and not line.startswith("["):
            out[key.strip()] = value.strip()
    return out
