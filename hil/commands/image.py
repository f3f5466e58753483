"""``hil image build OUT.img``: make a Raspberry Pi OS-shaped test image (and broken ones on purpose)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hil.errors import InputError
from hil.image.bootfs import BOOT_FILES
from hil.image.build import BROKEN, ImageSpec, MiB, build_image
from hil.image.compress import FORMATS
from hil.units import human_size, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    image = sub.add_parser("image", help="test images")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_sub.add_parser(
        "build", help="build a Raspberry Pi OS-shaped test image without root",
        description="Build a sparse image: MBR, FAT32 'bootfs' at 4 MiB with config.txt, cmdline.txt and "
                    "stand-in firmware, kernel and device tree for the model, then an ext4 'rootfs'.")
    build.add_argument("out", type=Path, help="raw image to write, e.g. out.img")
    build.add_argument("--model", default="cm4", choices=list(BOOT_FILES))
    build.add_argument("--size", default="256MiB", help="image size (default 256MiB)")
    build.add_argument("--boot-size", default="64MiB", help="boot partition size (default 64MiB)")
    build.add_argument("--build-id", help="written to /etc/build-id (default: random)")
    build.add_argument("--hostname", default="raspberrypi")
    build.add_argument("--config", action="append", default=[], metavar="LINE",
                       help="extra config.txt line (repeatable)")
    build.add_argument("--cmdline", action="append", default=[], metavar="ARG",
                       help="extra kernel argument in cmdline.txt (repeatable)")
    build.add_argument("--no-uart", action="store_true", help="leave enable_uart=1 out of config.txt")
    build.add_argument("--fill", default="0", metavar="SIZE",
                       help="incompressible data to put in the root filesystem, e.g. 100MiB")
    build.add_argument("--compress", default="", metavar="FORMATS",
                       help=f"also write compressed copies: comma-separated from {','.join(FORMATS)}")
    build.add_argument("--bmap", action="store_true", help="also write OUT.bmap with bmaptool")
    build.add_argument("--broken", choices=BROKEN,
                       help="break it on purpose: truncated/corrupt apply to the compressed copies if any, "
                            "else to the raw image; oversize needs --emmc-size")
    build.add_argument("--emmc-size", metavar="SIZE", help="the eMMC size an oversize image must exceed")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    spec = ImageSpec(
        model=args.model,
        size=_size("--size", args.size),
        boot_size=_size("--boot-size", args.boot_size),
        build_id=args.build_id,
        hostname=args.hostname,
        uart=not args.no_uart,
        config=tuple(args.config),
        cmdline=tuple(args.cmdline),
        fill=_size("--fill", args.fill),
        compress=tuple(f.strip() for f in args.compress.split(",") if f.strip()),
        bmap=args.bmap,
        broken=args.broken,
        emmc_size=_size("--emmc-size", args.emmc_size) if args.emmc_size else None,
    )
    built = build_image(args.out, spec)
    boot, root = built.layout.partitions
    print(f"image     {built.path}  {human_size(built.size)} ({built.size} bytes)"
          + (f"  BROKEN: {built.broken}" if built.broken else ""))
    print(f"sha256    {built.sha256}")
    print(f"model     {built.model}   build-id {built.build_id}   disk-id {built.disk_id:08x}")
    print(f"p1 bootfs FAT32 at {boot.start // MiB} MiB, {human_size(boot.size)};  "
          f"p2 rootfs ext4 at {root.start // MiB} MiB, {human_size(root.size)}")
    for path in built.outputs[1:]:
        print(f"wrote     {path}  {human_size(path.stat().st_size)}")
    return 0


def _size(option: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise InputError(f"{option}: {e}", stage="image.build") from None
