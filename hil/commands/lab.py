"""``hil lab``: rigs as labgrid places. serve (one controller's exporter), list, reserve, release, run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hil.errors import InfrastructureError, InputError

STAGE = "lab"


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="share rigs across controllers as labgrid places",
                         description="Rigs of many controllers as places of one labgrid coordinator: serve a "
                         "controller's rigs, list the places and who holds them, reserve and release, and run the "
                         "nightly on every place matching tags. The coordinator has no authentication: it is "
                         "reached only on the loopback address unless --allow-remote-coordinator.")
    cmds = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--coordinator", metavar="HOST:PORT",
                       default=os.environ.get("HIL_LAB_COORDINATOR") or None,
                       help="the labgrid coordinator (default: $HIL_LAB_COORDINATOR, the rig files', "
                       "or 127.0.0.1:20408)")
        p.add_argument("--allow-remote-coordinator", action="store_true",
                       help="reach a coordinator that is not on loopback (only over a trusted management network)")

    serve = cmds.add_parser("serve", help="run this controller's labgrid exporter for its rig files")
    serve.add_argument("--rig", action="extend", nargs="+", required=True, metavar="RIG.toml")
    serve.add_argument("--controller", required=True, help="this controller's name in the lab (the exporter's)")
    serve.add_argument("--site", default="", help="where the controller stands, e.g. room-2 (a place tag)")
    serve.add_argument("--config-out", type=Path, metavar="FILE", help="also write the exporter config here")
    serve.add_argument("--host", default="", help="the name other machines reach this controller by over ssh "
                       "(default: this host's name)")
    common(serve)
    serve.set_defaults(func=_serve)

    listing = cmds.add_parser("list", help="the places, their rigs and who holds them")
    listing.add_argument("tags", nargs="*", metavar="TAG=VALUE", help="only places with these tags")
    common(listing)
    listing.set_defaults(func=_list)

    reserve = cmds.add_parser("reserve", help="reserve and acquire one place matching tags, for this CI job")
    reserve.add_argument("tags", nargs="+", metavar="TAG=VALUE", help="e.g. model=cm4 site=room-2")
    reserve.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for one")
    common(reserve)
    reserve.set_defaults(func=_reserve)

    run = cmds.add_parser("run", help="the nightly on every place matching tags, in parallel; one merged report",
                          description="Runs `hil nightly` for each online place whose tags match, on its controller, "
                          "all at once; each takes its rig's lock (the place) for this CI job. The results are "
                          "labelled with rig, controller and site and merged into one Allure report, whose history "
                          "(history.jsonl beside the run folders) carries over from run to run.")
    run.add_argument("tags", nargs="*", metavar="TAG=VALUE", help="e.g. model=cm4 site=room-2 (none: every place)")
    run.add_argument("--report-dir", type=Path, metavar="DIR", help="default: reports/lab/<date-time>/")
    run.add_argument("--history", type=Path, metavar="FILE", help="Allure history file (default: beside DIR)")
    run.add_argument("--single-file", action="store_true", help="one index.html that opens from disk")
    run.add_argument("--image", action="append", default=[], metavar="[MODEL=]IMAGE",
                     help="the image to flash (copied once to each controller and cached there)")
    run.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], metavar="...",
                     help="the rest goes to each nightly's pytest (e.g. --pytest-args -k selfcheck)")
    common(run)
    run.set_defaults(func=_run)

    release = cmds.add_parser("release", help="release a place this CI job holds (--kick: whoever holds it)")
    release.add_argument("place")
    release.add_argument("--kick", action="store_true", help="release it even if another job holds it")
    common(release)
    release.set_defaults(func=_release)


def parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise InputError(f"{item!r} is not TAG=VALUE. Fix: e.g. model=cm4", stage=STAGE)
        tags[key] = value
    return tags


def _address(args: argparse.Namespace) -> str:
    return args.coordinator or "127.0.0.1:20408"


def _serve(args: argparse.Namespace) -> int:
    from hil.lab.serve import lab_coordinator, serve
    from hil.nightly import load_rigs

    rigs = load_rigs(args.rig)
    address, allow = lab_coordinator(rigs, args.coordinator, args.allow_remote_coordinator)
    return serve(rigs, address, controller=args.controller, site=args.site, allow_remote=allow,
                 config_out=args.config_out, host=args.host)


def _list(args: argparse.Namespace) -> int:
    from hil.lab.coordinator import Coordinator

    tags = parse_tags(args.tags)
    with Coordinator(_address(args), allow_remote=args.allow_remote_coordinator) as lab:
        views = [v for v in lab.places().values() if v.matches(tags)]
    rows = [("place", "rig", "controller", "site", "model", "state", "holder")]
    for v in sorted(views, key=lambda v: v.name):
        state = "held" if v.acquired else ("free" if v.available else "offline")
        rows.append((v.name, v.tags.get("rig", "-"), v.tags.get("controller", "-"), v.tags.get("site", "-"),
                     v.tags.get("model", "-"), state, v.acquired or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _reserve(args: argparse.Namespace) -> int:
    from hil.lab.coordinator import Coordinator, Holder

    me = Holder.this_process()
    job = Holder(me.host, me.job)  # no pid: the place stays this job's after this command ends
    with Coordinator(_address(args), holder=job, allow_remote=args.allow_remote_coordinator) as lab:
        _token, names = lab.reserve(parse_tags(args.tags), wait=args.wait)
        lab.acquire(names[0])
    print(f"{names[0]} reserved for {job}; release it with: hil lab release {names[0]}")
    return 0


def _release(args: argparse.Namespace) -> int:
    from hil.lab.coordinator import Coordinator, Holder

    me = Holder.this_process()
    job = Holder(me.host, me.job)
    with Coordinator(_address(args), holder=job, allow_remote=args.allow_remote_coordinator) as lab:
        view = lab.place(args.place)
        if view.acquired is None:
            print(f"{args.place} is not held")
            return 0
        if view.acquired != str(job) and not args.kick:
            raise InfrastructureError(f"{args.place} is held by {view.acquired}, not by this job ({job}). Fix: "
                                      "let that job release it, or --kick if it is gone", stage=STAGE,
                                      place=args.place)
        lab.release(args.place, holder=view.acquired)
        if view.reservation:  # else the place stays reserved for this job until the reservation expires
            lab.cancel(view.reservation)
    print(f"{args.place} released (was held by {view.acquired})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from hil.lab.run import run_lab, summary

    result = run_lab(_address(args), parse_tags(args.tags), allow_remote=args.allow_remote_coordinator,
                     report_dir=args.report_dir, history=args.history, single_file=args.single_file,
                     images=args.image, extra=args.pytest_args)
    print(summary(result))
    print(f"report: {result.index}" if result.index else "report: not rendered (no results)")
    return result.exit_code
