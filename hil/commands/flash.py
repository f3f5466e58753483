"""``hil flash IMAGE --rig RIG``: put the module in mass-storage mode, find and guard its disk, write,
verify, check the partitions and power it off again.

The image is checked before the module is even powered: a bad image costs nothing. ``--dry-run``
goes as far as the guarded disk and prints what would be written where.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from hil.control.relays import RelayBank
from hil.disk.discovery import wait_for_disk
from hil.disk.guard import check_still_same, guard_disk
from hil.errors import InputError
from hil.flash import bootfacts, customise
from hil.flash.bootfacts import read_boot_facts
from hil.flash.cache import ImageCache
from hil.flash.postcheck import check_partitions, device_path, lint_image, set_boot_options
from hil.flash.ranges import sparse_ranges, total
from hil.flash.sources import Image, open_image
from hil.flash.verify import verify_written
from hil.flash.writer import WriteResult, write_image
from hil.rig import Rig, load_rig
from hil.units import human_size
from hil.usbboot.host import UsbBoot


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flash", help="write an image to the module's eMMC and verify it",
                       description="USB-boot the rig's module into mass-storage mode, find its disk by USB port, "
                                   "refuse any other disk, write the image's mapped ranges, read them back and "
                                   "check the partitions.")
    p.add_argument("image", type=Path, help="raw image, or .xz, .gz, .zst, .bz2 (a .bmap next to it is used)")
    p.add_argument("--rig", required=True, help="rig file")
    p.add_argument("--dry-run", action="store_true", help="find and check the disk, print the plan, write nothing")
    p.add_argument("--no-verify", action="store_true", help="skip reading the written ranges back")
    p.add_argument("--payload", type=Path, help="usbboot payload folder (default: the rig's)")
    p.add_argument("--no-usbboot", action="store_true",
                   help="the module is already in mass-storage mode: do not power-cycle or USB-boot it")
    p.add_argument("--bmap", type=Path, help="a .bmap for the image (default: IMAGE.bmap if present)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config.txt option on the written image, e.g. enable_uart=1 (repeatable)")
    p.add_argument("--cmdline", action="append", default=[], metavar="ARG",
                   help="set a kernel argument in cmdline.txt (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="do not use or fill the decompressed-image cache")
    p.add_argument("--no-customise", action="store_true",
                   help="write the image as it is: no serial console, user, hostname or run token added (for images "
                        "prepared by hand; also [customise] enabled = false)")
    p.add_argument("--raw", action="store_true",
                   help="write the file even though it carries no valid MBR or GPT partition table (raw data)")
    p.set_defaults(func=_run)


def _options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "\n" in item:
            raise InputError(f"--config {item!r}: write KEY=VALUE, e.g. enable_uart=1", stage="flash")
        out[key.strip()] = value.strip()
    return out


class _Bar:
    """One status line, redrawn at most a few times a second (only on a terminal)."""

    def __init__(self, what: str):
        self.what = what
        self.shown = 0.0
        self.tty = sys.stderr.isatty()

    def write(self, position: int, size: int | None, written: int, seconds: float) -> None:
        self._draw(position / size if size else None, f"{human_size(written)} written", written, seconds)

    def verify(self, checked: int, need: int, seconds: float) -> None:
        self._draw(checked / need if need else None, f"{human_size(checked)} verified", checked, seconds)

    def _draw(self, fraction: float | None, text: str, done: int, seconds: float) -> None:
        now = time.monotonic()
        if not self.tty or now - self.shown < 0.2:
            return
        self.shown = now
        bar = "#" * int(30 * fraction) if fraction is not None else ""
        share = f"{fraction:4.0%}" if fraction is not None else "    "
        rate = done / seconds / 1e6 if seconds else 0.0
        print(f"\r{self.what} [{bar:<30}] {share} {text}, {rate:.1f} MB/s   ", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty and self.shown:
            print(file=sys.stderr)
            self.shown = 0.0


def _plan_text(image: Image) -> str:
    if image.bmap is not None:
        return f"{human_size(image.bmap.mapped_bytes)} mapped, from {image.bmap.path}"
    if not image.compressed:
        holes = sparse_ranges(image.path)
        if holes is not None:
            return f"{human_size(total(holes))} mapped, from the image's holes"
    return "mapped ranges found while decoding, from the partitions' filesystems"


def _power_usb_boot(relays: RelayBank, rig: Rig) -> None:
    if relays.power is None or relays.nrpi_boot is None:
        raise InputError(f"{rig.path} wires no nRPI_BOOT relay, so the module cannot be put in USB boot mode. "
                         "Fix: add [relays.nrpi_boot], or pass --no-usbboot with the module in mass storage",
                         stage="flash")
    relays.power.set(False)
    time.sleep(rig.relays.off_time)
    relays.nrpi_boot.set(True)
    relays.power.set(True)


def _run(args: argparse.Namespace) -> int:
    rig = load_rig(args.rig)
    config = _options(args.config)
    image = open_image(args.image, rig.emmc_size, bmap=args.bmap, raw=args.raw)
    for warning in lint_image(image, rig.model):
        print(f"hil: warning: {warning}", file=sys.stderr)
    plan = None
    if rig.customise.enabled and not args.no_customise and not args.raw:  # refused before anything is touched
        customise.check_image(image)
        plan = customise.plan(rig)
    size = human_size(image.size) if image.size is not None else "size known after decoding"
    print(f"image   {image.path} ({image.format}, {size}); {_plan_text(image)}")
    with contextlib.ExitStack() as stack:
        if not args.no_usbboot:  # the bank powers the module off again when the flash ends, however it ends
            _power_usb_boot(stack.enter_context(RelayBank(rig.relays)), rig)
            UsbBoot.for_rig(rig, args.payload).run()
        disk = wait_for_disk(rig.usb_port, rig.timeouts["mass_storage"], target=rig.usb_boot.disk)
        print(f"disk    {disk.describe()}" + (f", {disk.by_path}" if disk.by_path else ""))
        with guard_disk(disk, rig) as guarded:
            if args.dry_run:
                print(f"dry run: would write {image.path} to {disk.node} on USB port {disk.port}"
                      + ("" if args.no_verify else ", then read it back") + "; nothing written")
                return 0
            check_still_same(guarded, rig)
            bar, checked = _Bar("write "), []

            def read_back(written: WriteResult) -> None:  # runs while the decoder checks the image's rest
                bar.done()
                verify_bar = _Bar("verify")
                checked.append(verify_written(guarded.fd, disk.node, written.written, progress=verify_bar.verify))
                verify_bar.done()

            result = write_image(image, guarded.fd, disk.node, disk.size, progress=bar.write,
                                 cache=None if args.no_cache else ImageCache(),
                                 then=None if args.no_verify else read_back)
            bar.done()
            print(f"write   {human_size(result.bytes_written)} of {human_size(result.image_size)} in "
                  f"{result.seconds:.1f} s, {result.mbps:.1f} MB/s (plan: {result.plan}"
                  + (", from the cache" if result.from_cache else "") + ")")
            for check in checked:
                print(f"verify  {human_size(check.bytes_read)} in {check.seconds:.1f} s, "
                      f"{check.mbps:.1f} MB/s: identical")
            if args.raw:  # raw data on purpose: no partitions to check or edit
                return 0
            parts = check_partitions(guarded.fd, disk.node)
            if config or args.cmdline:
                set_boot_options(guarded.fd, disk.node, parts.boot, config, args.cmdline)
                print(f"options config.txt {config or '-'}; cmdline.txt {args.cmdline or '-'}")
            print(f"check   p{parts.boot.index} {parts.boot_fat} boot at {parts.boot.start // 1024**2} MiB, "
                  f"p{parts.root.index} ext4 root: ok")
            for change in customise.apply(guarded.fd, disk.node, parts.boot, plan) if plan else ():
                print(f"custom  {change}")
            facts = read_boot_facts(device_path(guarded.fd), rig.model.name, parts.boot, parts.root)
            bootfacts.save(rig, facts)
            if not facts.serial_console:
                print(f"hil: warning: {facts.why_silent}; `hil boot` cannot confirm this image", file=sys.stderr)
    return 0
