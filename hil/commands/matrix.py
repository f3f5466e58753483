"""``hil matrix``: boot a rig's module through each of its USB ports K times; table and picture of the history.

A virtual rig moves its own cable between ports; a real rig runs its ``[usb.select]`` command per port (a USB
switch, uhubctl), or, without one, runs one ``--port`` per invocation after the cable was moved. The runs meet
in ``matrix.db`` beside the nightly reports, and the table shows them together. The exit code is that of the
worst failure (a host-controller incompatibility is infrastructure, 3) unless ``--record-only``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hil.control.usbselect import command_cable
from hil.errors import ExitCode, InputError
from hil.matrix import Attempt, Cable, MatrixStore, format_table, plot, run_matrix
from hil.nightly import reports_root
from hil.rig import load_rig
from hil.session import RigSession, find_body


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("matrix", help="host-controller compatibility: boot through each USB port K times",
                       description="Boots the rig's module into USB mass storage K times through each of its USB "
                       "ports, records every attempt in REPORTS/matrix.db and prints the controller x model table "
                       "(passes/attempts over all runs, median seconds per stage); draws it to REPORTS/matrix.png.")
    p.add_argument("--rig", required=True, help="rig file listing the ports: [usb] ports = [...]")
    p.add_argument("--attempts", type=int, default=3, metavar="K", help="boots per port (default 3)")
    p.add_argument("--port", action="append", default=[], help="only this port (repeatable; default: all the "
                   "rig's). A real rig: the one the module is cabled to now")
    p.add_argument("--payload", type=Path, help="usbboot payload folder (default: the rig file's; virtual rigs: "
                   "a generated stand-in)")
    p.add_argument("--reports", type=Path, default=None, help="where matrix.db and matrix.png go (default: "
                   "HIL_REPORTS_DIR or reports/, beside the nightly reports and their history)")
    p.add_argument("--record-only", action="store_true", help="exit 0 even when a port fails: only add the "
                   "attempts to the history")
    p.set_defaults(func=_run)


def _progress(attempt: Attempt) -> None:
    print(attempt.describe(), flush=True)
    if not attempt.ok:
        for line in attempt.evidence.get("kernel_log") or []:
            print(f"    kernel: {line}")
        for key in ("kernel_log_note", "usbmon_note"):
            if attempt.evidence.get(key):
                print(f"    {attempt.evidence[key]}")


_WORST = (ExitCode.INPUT, ExitCode.INFRASTRUCTURE, ExitCode.PRODUCT)


def _run(args: argparse.Namespace) -> int:
    rig = load_rig(args.rig)
    args.reports = args.reports or reports_root()
    ports = list(args.port or rig.usb_ports)
    if args.attempts < 1:
        raise InputError(f"--attempts {args.attempts}: boot at least once per port", stage="matrix")
    # a rig body (the virtual rig) moves its own cable; a real rig runs its [usb.select] commands, checked now
    cable: Cable | None = None if find_body(rig) else command_cable(rig, ports)
    with RigSession(rig, rerun=sys.argv[1:]) as session, MatrixStore(args.reports) as store:
        cable = cable or getattr(session.body, "cable", None)
        run, attempts = run_matrix(session.lifecycle, args.attempts, session.payload(args.payload), store,
                                   ports=args.port, cable=cable, progress=_progress)
        cells = store.cells(run)
    print()
    print(format_table(cells), end="")
    picture = plot(cells, args.reports / "matrix.png")
    print(f"\nrun {run} added to {args.reports / 'matrix.db'}; picture {picture}")
    failed = [a for a in attempts if not a.ok]
    for a in failed:
        if a.incompatible:
            print(f"{a.port}: {a.message}")
    if not failed or args.record_only:
        return 0
    codes = {a.error.exit_code for a in failed if a.error is not None}
    code = next((c for c in _WORST if c in codes), ExitCode.INFRASTRUCTURE)
    ports_failed = sorted({a.port for a in failed})
    print(f"{len(failed)} of {len(attempts)} boots failed, on {', '.join(ports_failed)} (exit {int(code)}; "
          "--record-only to only record)", file=sys.stderr)
    return int(code)

