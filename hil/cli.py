"""The ``hil`` command. Each subcommand lives in a module of its own under ``hil/commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from hil.errors import HilError

#: Modules under hil.commands, each with ``register(subparsers)``; later issues add theirs here.
COMMAND_MODULES = ("rig", "image", "usbboot", "virtual", "rigcontrol", "flash", "nightly", "matrix", "eeprom", "report",
                   "lab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hil",
                                     description="Hardware-in-the-loop tests for Raspberry Pi Compute Modules.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"hil.commands.{name}").register(sub)
    return parser


def _version() -> str:
    try:
        return version("cm-hil")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HilError as e:
        print(f"hil: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("hil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
