"""``hil nightly --rig RIG [--rig RIG ...]``: the rig suites on every rig, then the Allure report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hil.nightly import SUITES, default_history, run_nightly, suite_titles
from hil.report.render import HISTORY_LIMIT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nightly", help="run the rig suites on every rig and render the report",
                       description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rig", action="extend", nargs="+", required=True, metavar="RIG.toml",
                   help="rig files, e.g. --rig rigs/virtual-*.toml (repeatable)")
    p.add_argument("--image", action="append", default=[], metavar="[MODEL=]IMAGE",
                   help="the image to flash, for every rig or (cm4=IMAGE) one model's; default: a 256 MiB test "
                   "image built per model")
    p.add_argument("--payload", action="append", default=[], metavar="[MODEL=]DIR",
                   help="usbboot payload folder (default: the rig file's; virtual rigs: a generated stand-in)")
    p.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="where results and the report go (default: reports/<date-time>/)")
    p.add_argument("--single-file", action="store_true",
                   help="render the report as one index.html that opens from disk without a web server")
    p.add_argument("--history", type=Path, metavar="FILE",
                   help="the history the report shows and this run joins (default: HIL_REPORTS_DIR or reports/, "
                   "file history.jsonl)")
    p.add_argument("--history-limit", type=int, default=HISTORY_LIMIT, metavar="N",
                   help=f"runs kept in the history (default {HISTORY_LIMIT})")
    p.add_argument("--no-history", action="store_true", help="render this run alone and record nothing")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- more pytest arguments (e.g. -k flash)")
    p.set_defaults(func=_run)


def _description() -> str:
    suites = suite_titles()
    listed = "\n".join(f"  {name:<24} {title}" for name, title in suites.items()) or f"  (none found in {SUITES})"
    return ("Runs every suite in suites/ on each rig, in parallel with one worker per rig (a test runs only on the\n"
            "rigs whose model and wiring it needs), then renders the Allure HTML report. The suites:\n"
            f"{listed}\n"
            "Exit status: 0 all passed, 4 a module or image failed, 3 a rig or the host failed, 2 bad input.")


def _run(args: argparse.Namespace) -> int:
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    result = run_nightly(args.rig, images=args.image, payloads=args.payload, report_dir=args.report_dir,
                         single_file=args.single_file, extra=extra,
                         history=None if args.no_history else (args.history or default_history()),
                         history_limit=args.history_limit)
    print(result.outcome.summary())
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.seconds.items())
    print(f"results: {result.report / 'allure-results'}, {result.report / 'junit.xml'} ({timings})")
    if result.index is None:
        print("report: not rendered (the run produced no results)", file=sys.stderr)
    elif args.single_file:
        print(f"report: {result.index} (opens from disk)")
    else:
        print(f"report: {result.index}\n        view it with: python3 -m http.server -d {result.index.parent} "
              "(then open http://localhost:8000), or render with --single-file to open it from disk")
    return int(result.exit_code)
