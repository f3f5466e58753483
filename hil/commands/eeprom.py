"""``hil eeprom build|flash|show``: the CM4/CM5 bootloader EEPROM, configured, flashed and checked.

``build`` puts a boot.conf into a pieeprom image and writes the matching pieeprom.sig (rpi-eeprom-config
--config, then rpi-eeprom-digest); ``flash`` writes a recovery folder to a rig's module over USB boot and proves
it (hil/eeprom/flash.py); ``show`` prints what a module's bootloader says about itself, or what an image holds.
Bad input exits 2 before anything reaches a module; 3 blames the rig, 4 the module or image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hil.eeprom.build import IMAGE_NAME, build_update
from hil.eeprom.flash import flash_eeprom, read_banner, show_image
from hil.eeprom.pieeprom import IMAGE_SIZES
from hil.errors import InputError
from hil.models import MODELS, ModuleModel
from hil.rig import load_rig
from hil.session import RigSession, find_body
from hil.units import seconds

_EEPROM_MODELS = sorted(name for name, m in MODELS.items() if m.has_eeprom)


def register(sub: argparse._SubParsersAction) -> None:
    eeprom = sub.add_parser("eeprom", help="CM4/CM5 bootloader EEPROM: build, flash, show")
    actions = eeprom.add_subparsers(dest="eeprom_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="put a boot.conf into a pieeprom image and write its .sig",
                               description="Validates boot.conf for the model, embeds it as bootconf.txt and "
                               "writes OUT/pieeprom.bin and OUT/pieeprom.sig (a recovery folder).")
    which = build.add_mutually_exclusive_group(required=True)
    which.add_argument("--rig", help="rig file (for its model)")
    which.add_argument("--model", choices=_EEPROM_MODELS)
    build.add_argument("--image", type=Path, required=True, help="source image, e.g. pieeprom.original.bin")
    build.add_argument("--config", type=Path, required=True, help="boot.conf to embed")
    build.add_argument("--out", type=Path, required=True, help="recovery folder to write into")
    build.add_argument("--timestamp", type=int, help="ts: in pieeprom.sig (default: now)")
    build.set_defaults(func=_build)

    flash = actions.add_parser("flash", help="write a recovery folder to the rig's EEPROM and prove it",
                               description="Releases EEPROM_nWP, USB-boots the recovery payload, checks "
                               "EEPROM_UPDATE and EEPROM_HASH against pieeprom.sig, restores EEPROM_nWP, checks "
                               "eeprom_write_protect if config.txt sets it, then power-cycles and reads the "
                               "bootloader's version and BOOT_ORDER from the UART.")
    flash.add_argument("--rig", required=True, help="rig file")
    flash.add_argument("--payload", type=Path, help="recovery folder (usbboot recovery/ or recovery5/; a virtual "
                       "rig: a generated stand-in unless given)")
    flash.add_argument("--keep-write-protect", action="store_true",
                       help="leave EEPROM_nWP pulled low during the update (rehearse a protected module)")
    flash.add_argument("--no-confirm", action="store_true", help="skip the UART check after the update")
    flash.add_argument("--settle", type=seconds, help="seconds between USB enumeration and the first request")
    flash.add_argument("--json", type=Path, metavar="FILE", help="write the result as JSON")
    flash.set_defaults(func=_flash)

    show = actions.add_parser("show", help="the bootloader a module runs (from its UART), or an image's config")
    where = show.add_mutually_exclusive_group(required=True)
    where.add_argument("--rig", help="rig file: power on and read the bootloader's banner")
    where.add_argument("--image", type=Path, help="pieeprom image: print its build and boot.conf")
    show.add_argument("--model", choices=_EEPROM_MODELS, help="with --image (default: from its size)")
    show.set_defaults(func=_show)


def _model(args: argparse.Namespace) -> ModuleModel:
    return load_rig(args.rig).model if args.rig else MODELS[args.model]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the {what} {path}: {e.strerror}. Fix: give an existing file",
                         stage="eeprom") from None


def _build(args: argparse.Namespace) -> int:
    model = _model(args)
    text = _read(args.config, "boot.conf").decode("utf-8", "replace")
    sig = build_update(args.out, _read(args.image, "image"), text, model, source_name=args.image,
                       config_name=args.config, timestamp=args.timestamp)
    print(f"{args.out / IMAGE_NAME}: {model.name} image with {args.config}; sha256 {sig.sha256}")
    return 0


def _flash(args: argparse.Namespace) -> int:
    options = {} if args.settle is None else {"settle": args.settle}
    rig = load_rig(args.rig)
    no_payload = InputError(f"no recovery folder for rig {rig.name}. Fix: pass --payload DIR (usbboot's recovery/ "
                            "or recovery5/, or one `hil eeprom build` wrote)", stage="eeprom.payload")
    if args.payload is None and find_body(rig) is None:
        raise no_payload
    with RigSession(rig, rerun=sys.argv[1:]) as session:
        payload = session.payload(args.payload, "recovery")
        if payload is None:
            raise no_payload
        result = flash_eeprom(session.lifecycle, payload, keep_write_protect=args.keep_write_protect,
                              confirm=not args.no_confirm, **options)
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    running = f"; bootloader {result.banner.version} BOOT_ORDER 0x{result.banner.boot_order:x}" if result.banner else ""
    print(f"{result.rig}: EEPROM updated (sha256 {result.sha256[:16]}..., BOOT_ORDER {result.boot_order}) in "
          f"{result.seconds:.1f} s{running}; write protection: {result.protection}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.rig:
        with RigSession(args.rig) as session:
            banner = read_banner(session.lifecycle)
        print(f"{session.rig.name}: bootloader VERSION {banner.version} ({banner.date}, BUILD_TIMESTAMP "
              f"{banner.build_timestamp}), BOOT_ORDER 0x{banner.boot_order:x}")
        return 0
    image = _read(args.image, "image")
    model = MODELS[args.model] if args.model else _model_by_size(len(image), args.image)
    facts, config = show_image(image, model, args.image)
    print(f"{args.image}: {model.name} bootloader VERSION {facts.version or '?'} BUILD_TIMESTAMP "
          f"{facts.build_timestamp or '?'}{' (cm-hil stand-in)' if facts.stand_in else ''}")
    print(f"BOOT_ORDER {config.boot_order}")
    print(config.text, end="" if config.text.endswith("\n") else "\n")
    return 0


def _model_by_size(size: int, path: Path) -> ModuleModel:
    for name in _EEPROM_MODELS:
        if IMAGE_SIZES.get(MODELS[name].chip_dir) == size:
            return MODELS[name]
    raise InputError(f"{path} is {size} bytes, the size of no bootloader image (cm4 524288, cm5 2097152). Fix: "
                     "give a pieeprom image, or --model", stage="eeprom.image")
