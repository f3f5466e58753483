"""``hil boot``, ``hil console`` and ``hil power``: drive one rig's module by hand.

Each command runs in a rig session (hil/session.py): it holds the rig's lock for as long as it runs, brings a
virtual rig's module up for its own duration, and leaves the rig safe when it ends, except ``hil power on``
on a switch that keeps its state without this process (uhubctl, commands).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import termios
import threading
import tty

from hil.control.console import Console
from hil.session import RigSession

QUIT = b"\x1d"  # Ctrl-]


def register(sub: argparse._SubParsersAction) -> None:
    boot = sub.add_parser("boot", help="power-cycle the module into its eMMC and prove which build booted",
                          description="Power-cycles with nRPI_BOOT released, follows the boot on the serial "
                          "console (bootloader, kernel, login), logs in and reads /etc/build-id; prints the "
                          "time to each milestone. Exit status 4 blames the module or image, 3 the rig.")
    boot.add_argument("--rig", required=True, help="rig file, e.g. rigs/virtual-cm4.toml")
    boot.add_argument("--expect-build-id", metavar="ID", help="fail unless the module booted this build")
    boot.add_argument("--json", action="store_true", help="print the boot record as JSON")
    boot.set_defaults(func=_boot)

    console = sub.add_parser("console", help="the module's serial console, interactive (Ctrl-] quits)")
    console.add_argument("--rig", required=True, help="rig file")
    console.add_argument("--power-on", action="store_true",
                         help="switch the module on (eMMC boot) once the console is open, to see it boot")
    console.set_defaults(func=_console)

    power = sub.add_parser("power", help="switch the module's power: on, off or cycle",
                           description="'on' and 'cycle' boot from the eMMC (nRPI_BOOT released); 'cycle' returns "
                           "once power is back. A relay is held only while this command runs ('on' waits, Ctrl-C "
                           "powers off); a hub port or command switch stays on until 'hil power off'.")
    power.add_argument("action", choices=("on", "off", "cycle"))
    power.add_argument("--rig", required=True, help="rig file")
    power.set_defaults(func=_power)


def _boot(args: argparse.Namespace) -> int:
    with RigSession(args.rig) as session:
        lifecycle = session.lifecycle
        record = lifecycle.boot(expect_build_id=args.expect_build_id)
    if args.json:
        print(json.dumps(record.to_dict(), indent=1))
    else:
        times = ", ".join(f"{name} {t:.2f} s" for name, t in record.markers.items())
        what = f"build-id {record.build_id}" if record.build_id else "an image without /etc/build-id"
        print(f"{record.rig}: booted {what} ({times} after power-on); log {record.log}")
        for key, value in record.identity.items():
            print(f"  {key}: {value}")
    return 0


def _power(args: argparse.Namespace) -> int:
    with RigSession(args.rig) as session:
        lifecycle = session.lifecycle
        if args.action == "off":
            lifecycle.off()
            print(f"{lifecycle.rig.name}: powered off", file=sys.stderr)
            return 0
        if args.action == "cycle":
            lifecycle.off()
            lifecycle.power_on()  # after the switch's off-time
            if lifecycle.power.holds_after_exit:
                lifecycle.leave_powered()
                print(f"{lifecycle.rig.name}: power cycled (eMMC boot); it stays on until `hil power off`",
                      file=sys.stderr)
            else:
                print(f"{lifecycle.rig.name}: power cycled (eMMC boot); {lifecycle.power.describe()} switches off "
                      "again as this command ends (`hil power on` holds it on)", file=sys.stderr)
            return 0
        lifecycle.power_on()
        if lifecycle.power.holds_after_exit:
            lifecycle.leave_powered()
            print(f"{lifecycle.rig.name}: powered on (eMMC boot); `hil power off` switches it off",
                  file=sys.stderr)
            return 0
        with contextlib.suppress(KeyboardInterrupt):  # from the message on: Ctrl-C is the way to end it
            print(f"{lifecycle.rig.name}: powered on (eMMC boot) while this command runs; Ctrl-C powers off",
                  file=sys.stderr, flush=True)
            threading.Event().wait()
    return 0


def _console(args: argparse.Namespace) -> int:
    with RigSession(args.rig) as session:
        lifecycle = session.lifecycle
        console = lifecycle.console
        print(f"hil: console {console.device} @ {console.baud}; log {console.log_path}; Ctrl-] quits",
              file=sys.stderr)
        if args.power_on:
            lifecycle.power_on()
        _interactive(console)
    return 0


def _interactive(console: Console) -> None:
    """Pass the terminal through to the console until Ctrl-], end of input or the console going away."""
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    console.on_receive(show)
    try:
        if saved is not None:
            tty.setraw(fd)
        while console.failure is None:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data:
                break
            data, quit_key, _ = data.partition(QUIT)
            if data:
                console.send(data)
            if quit_key:
                break
    finally:
        console.on_receive(None)
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    if console.failure is not None:
        raise console.failure
