"""The eMMC flash flow, written once: `hil flash`, the pytest plugin's ``flashed`` fixture and bench/flash.py
all run it.

Stages, in order, each reported to a :class:`FlashListener` (the CLI prints, the plugin makes Allure steps):
the module USB-booted into mass storage (``usbboot``, retried for the rig's sake only when asked), its disk
found on the rig's port (``disk.discovery``), guarded (``disk.guard``), written (``flash.write``), read back
(``flash.verify``), its partitions checked (``flash.partitions``), boot options set (``flash.options``), the
operating system customised (``flash.customise``: console, user, hostname, run token) and the build-id and boot
facts read (``flash.build-id``; the facts are kept for a later ``hil boot``). The module moves through the rig's
Lifecycle (usb-boot, mass-storage, flashed), so a failure anywhere leaves it safe; the caller owns the rig through
a :class:`~hil.session.RigSession`.

The image is opened and checked, and the customisation planned, by :func:`open_flash_image` and
:func:`customisation` before the rig is touched: a bad image costs nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.control.lifecycle import Lifecycle
from hil.disk.discovery import Disk, wait_for_disk
from hil.disk.guard import GuardedDisk, check_still_same, guard_disk
from hil.errors import Fault, HilError, InfrastructureError
from hil.flash import bootfacts, customise
from hil.flash.bootfacts import BootFacts, read_boot_facts
from hil.flash.cache import ImageCache
from hil.flash.customise import Change, Plan
from hil.flash.postcheck import PartitionCheck, check_partitions, device_path, lint_image, set_boot_options
from hil.flash.sources import Image, open_image
from hil.flash.verify import VerifyResult, verify_written
from hil.flash.writer import WriteResult, write_image
from hil.image import ext4
from hil.rig import Rig
from hil.usbboot.host import UsbBootResult
from hil.usbboot.trace import Listener


class FlashListener:
    """What a caller sees of a flash while it runs. Every hook does nothing unless a subclass says otherwise."""

    def stage(self, title: str) -> AbstractContextManager[object]:
        """Wraps one stage (``usbboot``, ``disk.discovery``, ``flash.write``, ...); exceptions pass through."""
        return contextlib.nullcontext()

    def usbboot_listener(self, attempt: int) -> Listener | None:
        """The listener for the USB boot host's own stages in this attempt."""
        return None

    def usbboot_ended(self, attempt: int, result: UsbBootResult | None, error: HilError | None) -> None:
        """One USB boot attempt is over: ``result``, or the ``error`` it failed with."""

    def disk_found(self, disk: Disk) -> None: ...

    def write_progress(self, position: int, size: int | None, written: int, mapped: int | None,
                       seconds: float) -> None:
        """``mapped``: the bytes to write when known up front (else only ``position`` of ``size`` tells)."""

    def verify_progress(self, checked: int, need: int, seconds: float) -> None: ...

    def customised(self, changes: list[Change]) -> None: ...


@dataclass
class FlashResult:
    """What a flash did; ``write`` is None after a dry run."""

    image: Image
    disk: Disk
    usbboot: UsbBootResult | None
    write: WriteResult | None = None
    verify: VerifyResult | None = None
    partitions: PartitionCheck | None = None
    build_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # config.txt and cmdline.txt changes made
    changes: list[Change] = field(default_factory=list)  # the OS customisation (none: not asked for)
    facts: BootFacts | None = None  # what the written image shows at boot
    seconds: float = 0.0  # wall time of write and read-back together


def open_flash_image(path: Path | str, rig: Rig, *, bmap: Path | None = None,
                     raw: bool = False) -> tuple[Image, list[str]]:
    """The image, refused (InputError) if it is broken or cannot fit the rig's eMMC (``raw``: it may carry no
    partition table), and the lint's warnings."""
    image = open_image(path, rig.emmc_size, bmap=bmap, raw=raw)
    return image, lint_image(image, rig.model)


def customisation(rig: Rig, image: Image, *, wanted: bool = True) -> Plan | None:
    """The customisation to write with ``image`` (None: the rig's [customise] or the caller says no); an image
    it cannot be applied to is refused here, before the rig is touched."""
    if not (wanted and rig.customise.enabled):
        return None
    customise.check_image(image)
    return customise.plan(rig)


def mass_storage_disk(lifecycle: Lifecycle, payload: str | Path | None, *, attempts: int = 1,
                      listener: FlashListener | None = None, **usbboot: Any) -> tuple[UsbBootResult, Disk]:
    """The module USB-booted into mass storage and its disk found on the rig's port.

    Up to ``attempts`` tries, the module powered off between them; only a fault of the rig's (enumeration
    on real hubs and controllers is known to be flaky) is tried again, and each failure stays in the
    error that ends the last try."""
    listener = listener or FlashListener()
    failures: list[str] = []
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        title = "usbboot" if attempt == 1 else f"usbboot (attempt {attempt} of {attempts})"
        try:
            with listener.stage(title):
                return _mass_storage_once(lifecycle, payload, attempt, listener, usbboot)
        except HilError as e:
            if e.fault is not Fault.INFRASTRUCTURE or attempt == attempts:
                if failures:
                    e.add_note("earlier attempts: " + "; ".join(failures))
                raise
            failures.append(f"attempt {attempt}: {e}")
            lifecycle.off()
    raise AssertionError("unreachable")


def _mass_storage_once(lifecycle: Lifecycle, payload: str | Path | None, attempt: int, listener: FlashListener,
                       usbboot: dict[str, Any]) -> tuple[UsbBootResult, Disk]:
    rig = lifecycle.rig
    trace = listener.usbboot_listener(attempt)
    try:
        result = lifecycle.mass_storage(payload, **usbboot, **({"listener": trace} if trace else {}))
    except HilError as e:
        listener.usbboot_ended(attempt, None, e)
        raise
    listener.usbboot_ended(attempt, result, None)
    with listener.stage("disk.discovery"):
        disk = wait_for_disk(rig.usb_port, rig.timeouts["mass_storage"], target=rig.usb_boot.disk)
        listener.disk_found(disk)
    return result, disk


def flash_emmc(lifecycle: Lifecycle | None, image: Image, *, rig: Rig | None = None,
               payload: str | Path | None = None, usbboot: bool = True, attempts: int = 1, dry_run: bool = False,
               verify: bool = True, cache: ImageCache | None = None,
               config: Mapping[str, str] | None = None, cmdline: Sequence[str] = (), plan: Plan | None = None,
               raw: bool = False, listener: FlashListener | None = None, **usbboot_options: Any) -> FlashResult:
    """Write ``image`` (from :func:`open_flash_image`) to the eMMC of the lifecycle's module and prove it.

    ``lifecycle`` None (then ``rig`` names the rig) with ``usbboot=False``: the module is already in mass storage
    by other means; it is neither power-cycled nor USB-booted, and no switch of the rig is touched. ``dry_run``
    stops at the guarded disk.
    ``raw``: raw data on purpose (``hil flash --raw``): written and verified, no partitions checked or edited."""
    listener = listener or FlashListener()
    if lifecycle is not None:
        rig = lifecycle.rig
    if rig is None or (usbboot and lifecycle is None):
        raise InfrastructureError("flash_emmc needs the rig's lifecycle to USB-boot the module, or a rig and "
                                  "usbboot=False", stage="flash")
    if usbboot:
        assert lifecycle is not None
        booted, disk = mass_storage_disk(lifecycle, payload, attempts=attempts, listener=listener, **usbboot_options)
    else:
        booted = None
        with listener.stage("disk.discovery"):
            disk = wait_for_disk(rig.usb_port, rig.timeouts["mass_storage"], target=rig.usb_boot.disk)
            listener.disk_found(disk)
    result = FlashResult(image, disk, booted)
    if dry_run:
        with guard_disk(disk, rig):
            return result

    def write() -> None:
        with guard_disk(disk, rig) as guarded:
            _write(guarded, rig, result, verify=verify, cache=cache, listener=listener)
            if not raw:
                _after_write(guarded, rig, result, config or {}, cmdline, plan, listener)

    if lifecycle is not None and usbboot:
        lifecycle.flash(write)
    else:
        write()
    if result.facts is not None:  # what a later boot, in this process or another, can expect to see
        if lifecycle is not None:
            lifecycle.flashed_facts = result.facts
        bootfacts.save(rig, result.facts)
    return result


def _write(guarded: GuardedDisk, rig: Rig, result: FlashResult, *, verify: bool, cache: ImageCache | None,
           listener: FlashListener) -> None:
    disk = guarded.disk
    with listener.stage("disk.guard"):
        check_still_same(guarded, rig)

    def read_back(written: WriteResult) -> None:  # runs while the decoder checks the image's rest
        with listener.stage("flash.verify"):
            result.verify = verify_written(guarded.fd, disk.node, written.written, progress=listener.verify_progress)

    started = time.monotonic()
    with listener.stage("flash.write"):
        result.write = write_image(result.image, guarded.fd, disk.node, disk.size, cache=cache,
                                   progress=listener.write_progress, then=read_back if verify else None)
    result.seconds = time.monotonic() - started


def _after_write(guarded: GuardedDisk, rig: Rig, result: FlashResult, config: Mapping[str, str],
                 cmdline: Sequence[str], plan: Plan | None, listener: FlashListener) -> None:
    """The checks and changes on the written disk, in order; a new step goes here."""
    with listener.stage("flash.partitions"):
        parts = result.partitions = check_partitions(guarded.fd, guarded.disk.node)
    if config or cmdline:
        with listener.stage("flash.options"):
            set_boot_options(guarded.fd, guarded.disk.node, parts.boot, config, list(cmdline))
            result.options = {"config": dict(config), "cmdline": list(cmdline)}
    if plan is not None:
        with listener.stage("flash.customise"):
            result.changes = customise.apply(guarded.fd, guarded.disk.node, parts.boot, plan)
            listener.customised(result.changes)
    with listener.stage("flash.build-id"):
        raw = ext4.read_file(device_path(guarded.fd), parts.root, "/etc/build-id")
        result.facts = read_boot_facts(device_path(guarded.fd), rig.model.name, parts.boot, parts.root)
    result.build_id = raw.decode(errors="replace").strip() if raw else None
