"""``hil report RESULTS... --out DIR``: render (or render again) the HTML report of allure-results folders.

The nightly job renders its own report; this command is for a report lost or wanted in another form (one file),
for results gathered from several controllers (merged into one report), and for adding a run to a history.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hil.report import render_report
from hil.report.render import HISTORY_LIMIT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render the HTML report of one or more allure-results folders",
                       description="Renders allure-results folders (several are merged into one report) with the "
                       "pinned Allure 3, offline. A report already in --out is replaced; any other content there is "
                       "refused.")
    p.add_argument("results", type=Path, nargs="+", metavar="RESULTS", help="allure-results folders")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the report goes")
    p.add_argument("--single-file", action="store_true", help="one index.html that opens from disk")
    p.add_argument("--name", default="cm-hil", help="the report's title")
    p.add_argument("--history", type=Path, metavar="FILE",
                   help="a history file (e.g. reports/history.jsonl) to show, and to add this run to")
    p.add_argument("--history-limit", type=int, default=HISTORY_LIMIT, metavar="N",
                   help=f"runs kept in the history (default {HISTORY_LIMIT})")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    index = render_report(args.results, args.out, single_file=args.single_file, name=args.name,
                          history=args.history, history_limit=args.history_limit)
    print(f"report: {index}" + (" (opens from disk)" if args.single_file else
                                f"\n        view it with: python3 -m http.server -d {index.parent}"))
    return 0
