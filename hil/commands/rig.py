"""``hil rig check RIG``: validate a rig file and print what it resolves to."""

from __future__ import annotations

import argparse

from hil.rig import describe, load_rig


def register(sub: argparse._SubParsersAction) -> None:
    rig = sub.add_parser("rig", help="rig files")
    rig_sub = rig.add_subparsers(dest="rig_command", required=True, metavar="ACTION")
    check = rig_sub.add_parser("check", help="validate a rig file and print the resolved rig")
    check.add_argument("rig", nargs="+", help="rig file(s), e.g. rigs/virtual-cm4.toml")
    check.add_argument("--offline", action="store_true",
                       help="skip checks against this machine (console device present)")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    for i, path in enumerate(args.rig):
        rig = load_rig(path, check_devices=not args.offline)
        if rig.is_virtual:  # the virtual module's own tables; only a virtual rig needs hil.virtual
            from hil.virtual.rig import validate

            validate(rig)
        if i:
            print()
        print(describe(rig))
    return 0
