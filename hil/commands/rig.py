"""``hil rig check RIG``: validate a rig file and print what it resolves to; ``hil rig status RIG``: who holds it and
what state it was left in."""

from __future__ import annotations

import argparse
import time

from hil.control.lifecycle import StateFile
from hil.control.power import power_switch
from hil.control.restcheck import read_rest
from hil.errors import HilError
from hil.lab.locks import rig_lock
from hil.rig import describe, load_rig


def register(sub: argparse._SubParsersAction) -> None:
    rig = sub.add_parser("rig", help="rig files")
    rig_sub = rig.add_subparsers(dest="rig_command", required=True, metavar="ACTION")
    check = rig_sub.add_parser("check", help="validate a rig file and print the resolved rig")
    check.add_argument("rig", nargs="+", help="rig file(s), e.g. rigs/virtual-cm4.toml")
    check.add_argument("--offline", action="store_true",
                       help="skip checks against this machine (console device present)")
    check.set_defaults(func=_check)
    status = rig_sub.add_parser("status", help="who holds a rig, what it last did, its lines as read now",
                                description="Prints the rig lock's holder (pid, command, since when), the last "
                                "state the state file recorded, and the power and relay lines as read now (only "
                                "when nobody holds the rig: reading a held line would take it from its holder). "
                                "Touches nothing.")
    status.add_argument("rig", help="rig file")
    status.set_defaults(func=_status)


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


def _status(args: argparse.Namespace) -> int:
    rig = load_rig(args.rig, check_devices=False)
    holder = rig_lock(rig).holder()
    print(f"rig        {rig.name}  ({rig.path})")
    print(f"lock       {'held by ' + holder if holder else 'free'}")
    left = StateFile(rig).read()
    if left:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(left.get("time", 0))))
        power = "on (left on on purpose)" if left.get("kept") else "on" if left.get("relays_on") else "off"
        print(f"last state {left.get('state', '?')}, power {power}; by pid {left.get('pid', '?')} "
              f"({' '.join(left.get('argv') or [])}) at {when}")
    else:
        print("last state (nothing recorded yet)")
    if holder:
        print("lines      not read: the holder drives them")
        return 0
    if rig.power.backend != "relay":
        switch = power_switch(rig)
        try:
            state = switch.read()
            reading = "unknown (no status command)" if state is None else "on" if state else "off"
        except HilError as e:
            reading = f"cannot be read now ({e.message})"
        print(f"power      {switch.describe()}: {reading}")
    for line in rig.relays.lines():
        level = "energised" if read_rest(line) else "released"
        print(f"line       {line.role:<10} GPIO{line.gpio} ({line.pin_factory}): {level}")
    return 0
