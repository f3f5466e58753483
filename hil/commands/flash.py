"""``hil flash IMAGE --rig RIG``: the flash flow (hil/flows/flash.py) in a rig session, printed as it goes.

The image is checked before the rig is even locked: a bad image costs nothing. ``--dry-run`` goes as far as
the guarded disk and prints what would be written where. A virtual rig's module and, where its rig file names
none, a stand-in payload come from the rig session.

Progress (hil/commands/progress.py) is a bar on a terminal, a line every few seconds in a CI log, or JSON events
with ``--json``; the summary ends with the total time and the image file's SHA-256, which ``--expect-sha256``
checks before the rig is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from hil.commands.progress import Progress, emit, progress_for
from hil.disk.discovery import Disk
from hil.errors import InputError
from hil.filehash import Sha256InBackground, sha256_file
from hil.flash import digest
from hil.flash.cache import ImageCache
from hil.flash.ranges import sparse_ranges, total
from hil.flash.sources import Image
from hil.flows.flash import FlashListener, FlashResult, customisation, flash_emmc, open_flash_image
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
    p.add_argument("--expect-sha256", metavar="HEX",
                   help="the image file's SHA-256 (as `sha256sum IMAGE` prints it); a different file is refused "
                        "(exit 2) before the rig is touched")
    p.add_argument("--json", action="store_true",
                   help="print events (stage, progress, result) as one JSON object per line on stdout, for "
                        "machines; the readable lines go to stderr")
    p.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a CI log) or with --json: a progress line this often "
                        "(default 5)")
    p.set_defaults(func=_run)


def _options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "\n" in item:
            raise InputError(f"--config {item!r}: write KEY=VALUE, e.g. enable_uart=1", stage="flash")
        out[key.strip()] = value.strip()
    return out


class _Printer(FlashListener):
    """The command's view of the flow: a line per stage result, progress as :mod:`hil.commands.progress` shows it
    and, with ``--json``, an event per stage."""

    def __init__(self, out: TextIO, progress: Progress, events: TextIO | None):
        self.out, self.progress, self.events = out, progress, events

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        if self.events is None:
            yield
            return
        started = time.monotonic()
        emit(self.events, "stage", stage=title, status="started")
        try:
            yield
        except BaseException as e:
            emit(self.events, "stage", stage=title, status="failed", seconds=round(time.monotonic() - started, 3),
                 error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        emit(self.events, "stage", stage=title, status="passed", seconds=round(time.monotonic() - started, 3))

    def disk_found(self, disk: Disk) -> None:
        print(f"disk    {disk.describe()}" + (f", {disk.by_path}" if disk.by_path else ""), file=self.out, flush=True)

    def write_progress(self, position: int, size: int | None, written: int, mapped: int | None,
                       seconds: float) -> None:
        # the mapped bytes when known up front; else how far into the image the decoder is
        fraction = None if mapped else (position / size if size else None)
        self.progress.update("write", written, mapped, seconds, fraction)

    def verify_progress(self, checked: int, need: int, seconds: float) -> None:
        self.progress.update("verify", checked, need, seconds)


def _expected_sha256(text: str | None) -> str | None:
    if text is None:
        return None
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InputError(f"--expect-sha256 {text!r}: give the 64 hex digits `sha256sum IMAGE` prints", stage="flash")
    return digest


def _plan_text(image: Image) -> str:
    if image.bmap is not None:
        return f"{human_size(image.bmap.mapped_bytes)} mapped, from {image.bmap.path}"
    if not image.compressed:
        holes = sparse_ranges(image.path)
        if holes is not None:
            return f"{human_size(total(holes))} mapped, from the image's holes"
    return "mapped ranges found while decoding, from the partitions' filesystems"


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    rig = load_rig(args.rig)
    config = _options(args.config)
    expected = _expected_sha256(args.expect_sha256)
    if not args.progress_every > 0:
        raise InputError(f"--progress-every {args.progress_every}: give a number of seconds above 0", stage="flash")
    image, warnings = open_flash_image(args.image, rig, bmap=args.bmap, raw=args.raw)  # bad: exit 2, rig untouched
    # a virtual rig: from here on under umockdev-wrapper, or in the kernel transport's guest (the command runs
    # again there, the image checked again); --no-usbboot leaves the rig's switches as they are
    session = RigSession(rig, rerun=sys.argv[1:], switches=not args.no_usbboot)
    out = sys.stderr if args.json else sys.stdout  # --json: stdout carries only the events
    for warning in warnings:
        print(f"hil: warning: {warning}", file=sys.stderr)
    plan = customisation(rig, image, wanted=not (args.no_customise or args.raw))  # refused before anything is touched
    size = human_size(image.size) if image.size is not None else "size known after decoding"
    print(f"image   {image.path} ({image.format}, {size}); {_plan_text(image)}", file=out, flush=True)
    sha256: str | None = None
    hashing: Sha256InBackground | None = None
    cache = None if args.no_cache else ImageCache()
    hasher = cache.key if cache is not None else sha256_file  # the cache key is the SHA-256: hashed once for both
    if expected is not None:  # hashed first: not a byte of a different image is written
        sha256 = hasher(image.path)
        if sha256 != expected:
            raise InputError(f"{image.path} has SHA-256 {sha256}, not the expected {expected}; nothing was written. "
                             "Fix: download the image again, or give the hash published for this file", stage="flash")
    elif not args.dry_run:  # for the summary, while the module boots and the image is written
        hashing = Sha256InBackground(image.path, hasher)
    printer = _Printer(out, progress_for(args.json, args.progress_every), sys.stdout if args.json else None)
    with session:
        try:
            result = flash_emmc(None if args.no_usbboot else session.lifecycle, image, rig=rig,
                                payload=session.payload(args.payload),
                                usbboot=not args.no_usbboot, dry_run=args.dry_run, verify=not args.no_verify,
                                cache=cache, config=config, cmdline=args.cmdline,
                                plan=plan, raw=args.raw, listener=printer)
        finally:
            printer.progress.end()
    if hashing is not None:
        sha256 = hashing.result()
    _summary(args, result, config, out)
    seconds = time.monotonic() - started
    if result.write is not None:
        print(f"total   {seconds:.1f} s; image sha256 {sha256}", file=out)
    if args.json:
        _result_event(result, sha256, seconds)
    if result.facts is not None and not result.facts.serial_console:
        print(f"hil: warning: {result.facts.why_silent}; `hil boot` cannot confirm this image", file=sys.stderr)
    return 0


def _summary(args: argparse.Namespace, result: FlashResult, config: dict[str, str], out: TextIO) -> None:
    disk = result.disk
    if result.write is None:
        print(f"dry run: would write {result.image.path} to {disk.node} on USB port {disk.port}"
              + ("" if args.no_verify else ", then read it back") + "; nothing written", file=out)
        return
    written = result.write
    print(f"write   {human_size(written.bytes_written)} of {human_size(written.image_size)} in "
          f"{written.seconds:.1f} s, {written.mbps:.1f} MB/s (plan: {written.plan}"
          + (", from the cache" if written.from_cache else "") + ")", file=out)
    if result.verify is not None:
        print(f"verify  {human_size(result.verify.bytes_read)} in {result.verify.seconds:.1f} s, "
              f"{result.verify.mbps:.1f} MB/s: identical ({digest.NAME})", file=out)
    if result.options:
        print(f"options config.txt {config or '-'}; cmdline.txt {args.cmdline or '-'}", file=out)
    parts = result.partitions
    if parts is None:  # --raw: raw data on purpose, no partitions to check or edit
        return
    print(f"check   p{parts.boot.index} {parts.boot_fat} boot at {parts.boot.start // 1024**2} MiB, "
          f"p{parts.root.index} ext4 root: ok" + (f"; build-id {result.build_id}" if result.build_id else ""),
          file=out)
    for change in result.changes:
        print(f"custom  {change}", file=out)


def _result_event(result: FlashResult, sha256: str | None, seconds: float) -> None:
    written, verified = result.write, result.verify
    emit(sys.stdout, "result", image=str(result.image.path), sha256=sha256, disk=result.disk.node,
         usb_port=result.disk.port, dry_run=written is None,
         bytes_written=written.bytes_written if written else None,
         write_seconds=round(written.seconds, 3) if written else None,
         write_mbps=round(written.mbps, 2) if written else None,
         plan=written.plan if written else None, from_cache=written.from_cache if written else None,
         bytes_verified=verified.bytes_read if verified else None,
         verify_seconds=round(verified.seconds, 3) if verified else None,
         build_id=result.build_id, seconds=round(seconds, 3))
