"""``hil flash IMAGE --rig RIG``: the flash flow (hil/flows/flash.py) in a rig session, printed as it goes.

The image is checked before the rig is even locked: a bad image costs nothing. ``--dry-run`` goes as far as
the guarded disk and prints what would be written where. A virtual rig's module and, where its rig file names
none, a stand-in payload come from the rig session.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hil.disk.discovery import Disk
from hil.errors import InputError
from hil.flash import digest
from hil.flash.cache import ImageCache
from hil.flash.ranges import sparse_ranges, total
from hil.flash.sources import Image
from hil.flows.flash import FlashListener, customisation, flash_emmc, open_flash_image
from hil.rig import load_rig
from hil.session import RigSession
from hil.units import human_size


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
                   help="the module is already in mass-storage mode: do not power-cycle or USB-boot it, and leave "
                   "the rig's switches as they are (the rig is still locked)")
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


class _Printer(FlashListener):
    """The command's view of the flow: a line per stage result, progress bars on a terminal."""

    def __init__(self) -> None:
        self.bar = _Bar("write ")

    def disk_found(self, disk: Disk) -> None:
        print(f"disk    {disk.describe()}" + (f", {disk.by_path}" if disk.by_path else ""), flush=True)

    def write_progress(self, position: int, size: int | None, written: int, seconds: float) -> None:
        self.bar.write(position, size, written, seconds)

    def verify_progress(self, checked: int, need: int, seconds: float) -> None:
        if self.bar.what != "verify":
            self.bar.done()
            self.bar = _Bar("verify")
        self.bar.verify(checked, need, seconds)


def _plan_text(image: Image) -> str:
    if image.bmap is not None:
        return f"{human_size(image.bmap.mapped_bytes)} mapped, from {image.bmap.path}"
    if not image.compressed:
        holes = sparse_ranges(image.path)
        if holes is not None:
            return f"{human_size(total(holes))} mapped, from the image's holes"
    return "mapped ranges found while decoding, from the partitions' filesystems"


def _run(args: argparse.Namespace) -> int:
    rig = load_rig(args.rig)
    config = _options(args.config)
    # a virtual rig: from here on under umockdev-wrapper; --no-usbboot leaves the rig's switches as they are
    session = RigSession(rig, rerun=sys.argv[1:], switches=not args.no_usbboot)
    image, warnings = open_flash_image(args.image, rig, bmap=args.bmap, raw=args.raw)  # bad: exit 2, rig untouched
    for warning in warnings:
        print(f"hil: warning: {warning}", file=sys.stderr)
    plan = customisation(rig, image, wanted=not (args.no_customise or args.raw))  # refused before anything is touched
    size = human_size(image.size) if image.size is not None else "size known after decoding"
    print(f"image   {image.path} ({image.format}, {size}); {_plan_text(image)}", flush=True)
    printer = _Printer()
    with session:
        try:
            result = flash_emmc(None if args.no_usbboot else session.lifecycle, image, rig=rig,
                                payload=session.payload(args.payload),
                                usbboot=not args.no_usbboot, dry_run=args.dry_run, verify=not args.no_verify,
                                cache=None if args.no_cache else ImageCache(), config=config, cmdline=args.cmdline,
                                plan=plan, raw=args.raw, listener=printer)
        finally:
            printer.bar.done()
    disk = result.disk
    if result.write is None:
        print(f"dry run: would write {image.path} to {disk.node} on USB port {disk.port}"
              + ("" if args.no_verify else ", then read it back") + "; nothing written")
        return 0
    written = result.write
    print(f"write   {human_size(written.bytes_written)} of {human_size(written.image_size)} in "
          f"{written.seconds:.1f} s, {written.mbps:.1f} MB/s (plan: {written.plan}"
          + (", from the cache" if written.from_cache else "") + ")")
    if result.verify is not None:
        print(f"verify  {human_size(result.verify.bytes_read)} in {result.verify.seconds:.1f} s, "
              f"{result.verify.mbps:.1f} MB/s: identical ({digest.NAME})")
    if result.options:
        print(f"options config.txt {config or '-'}; cmdline.txt {args.cmdline or '-'}")
    parts = result.partitions
    if parts is None:  # --raw: raw data on purpose, no partitions to check or edit
        return 0
    print(f"check   p{parts.boot.index} {parts.boot_fat} boot at {parts.boot.start // 1024**2} MiB, "
          f"p{parts.root.index} ext4 root: ok" + (f"; build-id {result.build_id}" if result.build_id else ""))
    for change in result.changes:
        print(f"custom  {change}")
    if result.facts is not None and not result.facts.serial_console:
        print(f"hil: warning: {result.facts.why_silent}; `hil boot` cannot confirm this image", file=sys.stderr)
    return 0
