"""``hil usbboot``: boot a module over USB from a payload folder, like ``rpiboot -p PATH -d DIR``.

With ``--rig`` the command owns the rig (a rig session): it power-cycles the module into USB boot, serves it and
powers it off when it ends. With ``--port`` it serves whatever boot ROM is on that port, as rpiboot does.

Stages and files are printed as they pass; ``--json`` keeps the whole result (or the failure and its
evidence) for a nightly report. The exit code says whose fault a failure was (hil/errors.py ExitCode).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from hil.errors import HilError, InputError
from hil.models import MODELS
from hil.rig import Rig, load_rig, parse_stage_timeout
from hil.session import RigSession, find_body
from hil.units import human_size, seconds
from hil.usbboot.host import DEFAULT_ROM_RETRIES, DEFAULT_SETTLE, READ_TIMEOUT, UsbBoot, UsbBootResult
from hil.usbboot.trace import FileServed, Listener, StageTiming

_STAGES = ("rom", "rom_transfer", "second_stage", "file_server", "mass_storage")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("usbboot", help="boot a module over USB (rpiboot) on one port",
                       description="Boot the module on a USB port from a usbboot payload folder.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--rig", help="rig file: its port, model, timeouts and payload")
    where.add_argument("--port", help="USB port path BUS-PORT[.PORT...], e.g. 1-1.4 (as rpiboot -p)")
    p.add_argument("--payload", type=Path, help="payload folder (as rpiboot -d), e.g. mass-storage-gadget64")
    p.add_argument("--model", choices=sorted(MODELS), help="module model (default: from the boot ROM)")
    p.add_argument("--expect", choices=("auto", "mass-storage", "nothing"), default="auto",
                   help="what follows the file server (auto: nothing for recovery payloads)")
    p.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                   help=f"override a stage timeout ({', '.join(_STAGES)})")
    p.add_argument("--settle", type=seconds,
                   help=f"seconds between enumeration and the first request (default {DEFAULT_SETTLE:g}, scaled by "
                   "a virtual rig's speed-up)")
    p.add_argument("--read-timeout", type=seconds, default=READ_TIMEOUT,
                   help=f"seconds per status/request read (default {READ_TIMEOUT:g})")
    p.add_argument("--rom-retries", type=int, default=None,
                   help=f"failed ROM exchanges to repeat (default: the rig file's, else {DEFAULT_ROM_RETRIES})")
    p.add_argument("--signed", action="store_true", default=None,
                   help="send bootcode.sig in the boot message to a CM1/CM3 (as rpiboot -s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the result (or the failure) as JSON")
    p.add_argument("--metadata", type=Path, metavar="FILE", help="write the device's metadata as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=_run)


class _Progress(Listener):
    def __init__(self, out: TextIO):
        self.out = out

    def stage_started(self, stage: StageTiming) -> None:
        self._line(stage.start, f"{stage.name} ...")

    def stage_ended(self, stage: StageTiming) -> None:
        state = "ok" if stage.ok else "FAILED"
        detail = f"  {stage.detail}" if stage.detail else ""
        self._line(stage.start + stage.duration, f"{stage.name} {state} in {stage.duration:.3f} s{detail}")

    def file_served(self, served: FileServed) -> None:
        what = f"{human_size(served.size)} from {served.source}" if served.source else "missing"
        self._line(None, f"  file {served.name}: {what}")

    def _line(self, t: float | None, text: str) -> None:
        stamp = f"[{t:8.3f}]" if t is not None else " " * 10
        print(f"{stamp} {text}", file=self.out, flush=True)


def _timeouts(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        parsed = parse_stage_timeout(item)
        if parsed is None:
            raise InputError(f"--timeout {item!r}: write STAGE=SECONDS with a positive number and a stage "
                             f"from {', '.join(_STAGES)}", stage="usbboot")
        out[parsed[0]] = parsed[1]
    return out


def _run(args: argparse.Namespace) -> int:
    options: dict[str, Any] = dict(
        read_timeout=args.read_timeout,
        **{k: v for k, v in (("rom_retries", args.rom_retries), ("signed", args.signed)) if v is not None},
        expect_mass_storage={"auto": None, "mass-storage": True, "nothing": False}[args.expect],
        metadata_json=args.metadata, listener=Listener() if args.quiet else _Progress(sys.stdout))
    if args.settle is not None:
        options["settle"] = args.settle
    timeouts = _timeouts(args.timeout)
    try:
        if args.rig:
            rig = load_rig(args.rig)
            if args.model and MODELS[args.model] != rig.model:
                raise InputError(f"--model {args.model} contradicts {rig.path} (model {rig.model.name}). "
                                 "Fix: drop --model or correct the rig file", stage="usbboot")
            result = _on_rig(replace(rig, timeouts={**rig.timeouts, **timeouts}), args.payload, options)
        else:
            if args.payload is None:
                raise InputError("--port needs --payload DIR (a usbboot folder such as "
                                 "mass-storage-gadget64)", stage="usbboot")
            result = UsbBoot(args.port, args.payload, MODELS[args.model] if args.model else None,
                             timeouts=timeouts, **options).run()
    except HilError as e:
        if args.json:
            failure = {"ok": False, "error": e.message, "stage": e.stage, "fault": e.fault.value,
                       "evidence": e.evidence}
            args.json.write_text(json.dumps(failure, indent=1, default=str) + "\n", encoding="utf-8")
        raise
    if args.json:
        args.json.write_text(result.to_json() + "\n", encoding="utf-8")
    print(_summary(result))
    return 0


def _on_rig(rig: Rig, payload: Path | None, options: dict[str, Any]) -> UsbBootResult:
    """The rig's module power-cycled with nRPI_BOOT asserted and booted from the payload, in a rig session (a
    virtual rig's module and stand-in payload come with it); the session powers it off at the end."""
    if payload is None and find_body(rig) is None:
        UsbBoot.for_rig(rig)  # without a payload anywhere its InputError names the fix, before anything is touched
    with RigSession(rig, rerun=sys.argv[1:]) as session:
        return session.lifecycle.mass_storage(session.payload(payload), **options)


def _summary(result: UsbBootResult) -> str:
    total = sum(s.duration for s in result.stages)
    sent = sum(f.size for f in result.files_served)
    end = f"now {result.final_identity}" if result.final_identity else "no device after the file server"
    lines = [f"usbboot {result.model} on {result.port}: {total:.2f} s, {len(result.files_served)} file(s), "
             f"{human_size(sent)} sent; {end}"]
    if len(result.rom_attempts) > 1 or any(a.get("status") for a in result.rom_attempts):
        lines += [f"  ROM exchange {a['attempt']}: {a.get('outcome', '?')}" for a in result.rom_attempts]
    lines += [f"  {key}: {value}" for key, value in result.metadata.items()]
    return "\n".join(lines)
