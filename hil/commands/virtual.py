"""``hil virtual``: run programs against a virtual rig, make stand-in payloads, self-test the rig."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hil.errors import InfrastructureError, InputError, ProductError
from hil.hostenv import umockdev_active
from hil.relays import RelayBank
from hil.rig import Rig, load_rig, runtime_dir


def register(sub: argparse._SubParsersAction) -> None:
    virtual = sub.add_parser("virtual", help="the virtual rig (a simulated Compute Module)")
    actions = virtual.add_subparsers(dest="virtual_command", required=True, metavar="ACTION")

    run = actions.add_parser("run", help="power the virtual module and run PROGRAM against it",
                             description="Powers the virtual module (nRPI_BOOT asserted unless --boot-mode emmc) "
                             "and runs PROGRAM, which sees the module's USB devices, disk and console as the "
                             "framework does; afterwards prints what the module went through.")
    run.add_argument("--rig", required=True, help="a virtual rig file, e.g. rigs/virtual-cm4.toml")
    run.add_argument("--boot-mode", choices=("usb", "emmc"), default="usb")
    run.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    run.set_defaults(func=_run)

    payload = actions.add_parser("payload", help="write stand-in USB boot payload folders")
    payload.add_argument("dir", type=Path, help="folder to create the payload folder(s) in")
    payload.add_argument("--kind", action="append", help="msd, mass-storage-gadget64, recovery or recovery5 "
                         "(repeatable; default: all)")
    payload.set_defaults(func=_payload)

    selftest = actions.add_parser("selftest", help="take the virtual module through its whole life once")
    selftest.add_argument("--rig", required=True, help="a virtual rig file, e.g. rigs/virtual-cm4.toml")
    selftest.set_defaults(func=_selftest)


def ensure_umockdev(argv: list[str]) -> None:
    """Re-run this command under umockdev-wrapper, so libusb and udev see the virtual USB devices."""
    if umockdev_active():
        return
    wrapper = shutil.which("umockdev-wrapper")
    if wrapper is None:
        raise InfrastructureError("umockdev-wrapper is not installed; run ./setup.sh", stage="virtual")
    sys.stdout.flush()
    os.execv(wrapper, [wrapper, sys.executable, "-m", "hil.cli", *argv])


def _virtual_rig(path: str) -> Rig:
    rig = load_rig(path)
    if rig.virtual is None:
        raise InputError(f"{path} describes real hardware; use a rig file with a [virtual] section, "
                         "e.g. rigs/virtual-cm4.toml", stage="virtual")
    return rig


def _run(args: argparse.Namespace) -> int:
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise InputError("no PROGRAM given; write: hil virtual run --rig RIG -- PROGRAM ARGS...", stage="virtual")
    rig = _virtual_rig(args.rig)
    ensure_umockdev(sys.argv[1:])
    from hil.virtual.rig import VirtualRig
    from hil.virtual.usb.umockdev_bus import UsbBus

    with VirtualRig(rig) as vrig, RelayBank(rig.relays) as relays:
        assert relays.power is not None
        if relays.nrpi_boot is not None:
            relays.nrpi_boot.set(args.boot_mode == "usb")
        relays.power.set(True)
        env = {**os.environ, **UsbBus.get().child_env(), "HIL_RUNTIME_DIR": str(runtime_dir())}
        print(f"hil: virtual {rig.model.name} powered ({args.boot_mode} boot); USB port {rig.usb_port}, "
              f"console {rig.console.device}", file=sys.stderr)
        try:
            code = subprocess.run(program, env=env, check=False).returncode
        except FileNotFoundError:
            raise InputError(f"cannot run {program[0]!r}: no such program", stage="virtual") from None
        state = vrig.module.state
        relays.safe()
    print(_report(vrig, state), file=sys.stderr)
    return code


def _report(vrig: object, state: object) -> str:
    from hil.virtual.rig import VirtualRig

    assert isinstance(vrig, VirtualRig)
    journal = vrig.journal
    stages = " -> ".join(journal.stages()) or "(none)"
    files = [f"{e.what} ({e.details.get('size', '?')} bytes)" if e.details.get("size") else f"{e.what} (missing)"
             for e in journal.events("file")]
    received = sum(int(e.details.get("bytes", 0)) for e in journal.events("bulk"))
    faults = [e.what for e in journal.events("fault")]
    lines = [
        f"virtual {vrig.rig.model.name} on {vrig.rig.usb_port}:",
        f"  stages reached   {stages}",
        f"  files requested  {', '.join(files) or '(none)'}",
        f"  bytes received   {received}",
        f"  faults           {', '.join(faults) or '(none)'}",
        f"  final state      {state}",
    ]
    return "\n".join(lines)


def _payload(args: argparse.Namespace) -> int:
    from hil.virtual.usb.payloads import KINDS, make_payload

    for kind in args.kind or KINDS:
        print(make_payload(args.dir, kind))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    """Load a fresh test image, boot it from eMMC, prove its build-id over the console, then show the ROM."""
    rig = _virtual_rig(args.rig)
    ensure_umockdev(sys.argv[1:])
    from hil.bootmode import wait_for_rom
    from hil.console import Console
    from hil.image.build import ImageSpec, build_image
    from hil.virtual.rig import VirtualRig

    steps: list[tuple[str, float, str]] = []

    def step(name: str, t0: float, result: str) -> None:
        steps.append((name, time.monotonic() - t0, result))
        print(f"  {name:<28} {steps[-1][1]:7.2f} s  {result}", file=sys.stderr)

    print(f"hil: self-test of {rig.name} ({rig.model.name})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="hil-selftest-") as tmp:
        t0 = time.monotonic()
        image = build_image(Path(tmp) / "test.img", ImageSpec(model=rig.model.name, size=min(256 * 2**20,
                                                                                           rig.emmc_size)))
        step("build test image", t0, f"{image.size // 2**20} MiB, build-id {image.build_id}")
        with VirtualRig(rig) as vrig, RelayBank(rig.relays) as relays:
            assert relays.power is not None and relays.nrpi_boot is not None
            t0 = time.monotonic()
            with open(image.path, "rb") as src, open(vrig.emmc.image_path, "r+b") as dst:
                shutil.copyfileobj(src, dst, 4 * 2**20)
            step("load image onto eMMC", t0, str(vrig.emmc.image_path))
            with Console(rig.console.device, rig.console.baud, forbidden=rig.forbidden,
                         log_path=runtime_dir() / rig.name / "selftest-console.log") as console:
                t0 = time.monotonic()
                relays.power.set(True)
                console.login(timeout=rig.timeouts["login"], login_prompt=rig.markers["login"])
                step("power on, boot to login", t0, "logged in as root")
                t0 = time.monotonic()
                got = console.run("cat /etc/build-id", timeout=rig.timeouts["command"]).output.strip()
                if got != image.build_id:
                    raise ProductError(f"the module booted build-id {got!r}, not {image.build_id!r}",
                                       stage="selftest.build-id")
                step("read build-id", t0, got)
                relays.power.set(False)
                time.sleep(rig.relays.off_time)
            t0 = time.monotonic()
            relays.nrpi_boot.set(True)
            relays.power.set(True)
            rom = wait_for_rom(rig, rig.timeouts["rom"])
            step("nRPI_BOOT: ROM on USB port", t0, f"0a5c:{rom.pid:04x} on {rig.usb_port}")
            state = vrig.module.state
            relays.safe()
    print(_report(vrig, state), file=sys.stderr)
    print(f"hil: self-test of {rig.name} passed ({sum(s[1] for s in steps):.1f} s)", file=sys.stderr)
    return 0
