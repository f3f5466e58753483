"""``hil matrix``: boot a rig's module through each of its USB ports K times; table and picture of the history.

A virtual rig moves its own cable between ports. A real module is cabled to one port at a time, so a real
rig with several ports runs one ``--port`` per invocation (after moving the cable); the runs meet in
``reports/matrix.db`` and the table shows them together.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from hil.control.lifecycle import Lifecycle
from hil.errors import InputError
from hil.matrix import Attempt, Cable, MatrixStore, format_table, plot, run_matrix
from hil.rig import Rig, load_rig


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
    p.add_argument("--reports", type=Path, default=Path("reports"), help="where matrix.db and matrix.png go "
                   "(default: reports)")
    p.set_defaults(func=_run)


def _progress(attempt: Attempt) -> None:
    print(attempt.describe(), flush=True)


def _run(args: argparse.Namespace) -> int:
    rig = load_rig(args.rig)
    if not rig.is_virtual and len(args.port or rig.usb_ports) > 1:
        raise InputError(f"rig {rig.name} is real hardware: its module is cabled to one USB port at a time. Fix: "
                         "run `hil matrix --rig ... --port PORT` once per port, moving the cable in between; the "
                         f"runs add up in {args.reports / 'matrix.db'}", stage="matrix")
    with contextlib.ExitStack() as stack:
        cable: Cable | None = None
        payload = args.payload or rig.payload
        if rig.is_virtual:
            cable, payload = _virtual(stack, rig, payload)
        lifecycle = stack.enter_context(Lifecycle(rig))
        store = stack.enter_context(MatrixStore(args.reports))
        run, _ = run_matrix(lifecycle, args.attempts, payload, store, ports=args.port, cable=cable,
                            progress=_progress)
        cells = store.cells(run)
    print()
    print(format_table(cells), end="")
    picture = plot(cells, args.reports / "matrix.png")
    print(f"\nrun {run} added to {args.reports / 'matrix.db'}; picture {picture}")
    return 0


def _virtual(stack: contextlib.ExitStack, rig: Rig, payload: Path | None) -> tuple[Cable, Path]:
    """The virtual module (under umockdev-wrapper), its cable, and a stand-in payload unless one is given."""
    from hil.commands.virtual import ensure_umockdev

    ensure_umockdev(sys.argv[1:])
    from hil.virtual.rig import VirtualRig
    from hil.virtual.usb.payloads import make_payload

    vrig = stack.enter_context(VirtualRig(rig))
    if payload is None:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cm-hil-matrix-")))
        payload = make_payload(work, "msd" if rig.model.chip_dir == "2710" else "mass-storage-gadget64",
                               (rig.model.name,))
    return vrig.cable, payload
