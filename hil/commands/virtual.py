"""``hil virtual``: run programs against a virtual rig, make stand-in payloads, self-test the rig."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hil.errors import InputError
from hil.rig import Rig, load_rig, runtime_dir
from hil.session import RigSession

if TYPE_CHECKING:
    from hil.control.lifecycle import Lifecycle
    from hil.virtual.module import State
    from hil.virtual.rig import VirtualRig


def register(sub: argparse._SubParsersAction) -> None:
    virtual = sub.add_parser("virtual", help="the virtual rig (a simulated Compute Module)")
    actions = virtual.add_subparsers(dest="virtual_command", required=True, metavar="ACTION")

    run = actions.add_parser("run", help="power the virtual module and run PROGRAM against it",
                             description="Powers the virtual module (nRPI_BOOT asserted unless --boot-mode emmc) "
                             "and runs PROGRAM, which sees the module's USB devices, disk and console as the "
                             "framework does; afterwards prints what the module went through.")
    run.add_argument("--rig", required=True, help="a virtual rig file, e.g. rigs/virtual-cm4.toml")
    run.add_argument("--boot-mode", choices=("usb", "emmc"), default="usb")
    run.add_argument("--transport", choices=("umockdev", "kernel"),
                     help="umockdev: the module's USB devices are faked behind libusb and udev in this process; "
                     "kernel: PROGRAM runs in a QEMU guest whose Linux USB stack (dummy_hcd, usbfs, usb-storage, "
                     "udev) sees the module, with a usbmon trace of the run (default: the rig file's [virtual] "
                     "transport)")
    run.add_argument("--share", action="append", type=Path, default=[], metavar="DIR",
                     help="on the kernel transport: a folder PROGRAM may write besides the project, the working "
                     "folder and the HIL_*_DIR folders (repeatable)")
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


def _virtual_rig(path: str) -> Rig:
    rig = load_rig(path)
    if rig.virtual is None:
        raise InputError(f"{path} describes real hardware; use a rig file with a [virtual] section, "
                         "e.g. rigs/virtual-cm4.toml", stage="virtual")
    return rig


@contextlib.contextmanager
def _session(path: Rig | str) -> Iterator[tuple[VirtualRig, Lifecycle]]:
    """The virtual module and the lifecycle that drives it, in a rig session under umockdev-wrapper."""
    with RigSession(path, rerun=sys.argv[1:]) as session:
        yield session.body, session.lifecycle


def _run(args: argparse.Namespace) -> int:
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise InputError("no PROGRAM given; write: hil virtual run --rig RIG -- PROGRAM ARGS...", stage="virtual")
    from hil.virtual.usb.kernel_bus import kernel_transport

    rig = _virtual_rig(args.rig)
    assert rig.virtual is not None
    if args.transport == "umockdev" and rig.virtual.transport == "kernel":
        raise InputError(f"{rig.path} puts the module on the kernel USB transport; every command with it runs in "
                         "the QEMU guest. Fix: leave out --transport, or use a rig file without transport = "
                         '"kernel"', stage="virtual")
    if (args.transport or rig.virtual.transport) == "kernel" and not kernel_transport():
        return _run_in_guest(args, rig, program)
    with _session(rig) as (vrig, lifecycle):
        if args.boot_mode == "usb":
            lifecycle.usb_boot()  # PROGRAM starts once the boot ROM is on the port
        else:
            lifecycle.power_on()
        env = {**_child_env(), "HIL_RUNTIME_DIR": str(runtime_dir())}
        print(f"hil: virtual {rig.model.name} powered ({args.boot_mode} boot); USB port {rig.usb_port}, "
              f"console {rig.console.device}", file=sys.stderr)
        try:
            code = subprocess.run(program, env=env, check=False).returncode
        except FileNotFoundError:
            raise InputError(f"cannot run {program[0]!r}: no such program", stage="virtual") from None
        state = vrig.module.state
    print(_report(vrig, state), file=sys.stderr)
    return code


def _child_env() -> dict[str, str]:
    from hil.virtual.usb.kernel_bus import kernel_transport

    if kernel_transport():
        return dict(os.environ)  # the guest's own kernel has the devices: nothing to redirect
    from hil.virtual.usb.umockdev_bus import UsbBus

    return UsbBus.get().child_env()


def _run_in_guest(args: argparse.Namespace, rig: Rig, program: list[str]) -> int:
    """The same command in the kernel-transport guest; its usbmon trace and kernel log stay in the job folder."""
    from hil.virtual.guest.vm import run_python
    from hil.virtual.usb.kernel_bus import root_port

    root_port(rig.usb_port)  # a hub path cannot exist there: say so before the guest boots
    if missing := [str(p) for p in args.share if not p.is_dir()]:
        raise InputError(f"--share {', '.join(missing)}: no such folder", stage="virtual")
    print(f"hil: starting the kernel-transport guest for {rig.name}", file=sys.stderr)
    return run_python(["-m", "hil.cli", "virtual", "run", "--rig", str(Path(args.rig).resolve()),
                       "--boot-mode", args.boot_mode, "--", *program], shares=tuple(args.share))


def _report(vrig: VirtualRig, state: State) -> str:
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
    from hil.image.build import ImageSpec, build_image
    from hil.virtual.body import ensure_umockdev

    ensure_umockdev(sys.argv[1:])  # before the image is built: the re-run would build it again

    steps: list[float] = []

    def step(name: str, seconds: float, result: str) -> None:
        steps.append(seconds)
        print(f"  {name:<28} {seconds:7.2f} s  {result}", file=sys.stderr)

    print(f"hil: self-test of {rig.name} ({rig.model.name})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="hil-selftest-") as tmp:
        t0 = time.monotonic()
        image = build_image(Path(tmp) / "test.img", ImageSpec(model=rig.model.name, size=min(256 * 2**20,
                                                                                           rig.emmc_size)))
        step("build test image", time.monotonic() - t0, f"{image.size // 2**20} MiB, build-id {image.build_id}")
        with _session(rig) as (vrig, lifecycle):

            def load() -> None:  # natively, as an eMMC programmer would, while the module is off
                with open(image.path, "rb") as src, open(vrig.emmc.image_path, "r+b") as dst:
                    shutil.copyfileobj(src, dst, 4 * 2**20)

            t0 = time.monotonic()
            lifecycle.flash(load, build_id=image.build_id)
            step("load image onto eMMC", time.monotonic() - t0, str(vrig.emmc.image_path))
            record = lifecycle.boot(expect_build_id=image.build_id)  # times counted from power-on
            step("power on, boot to login", record.markers["login"], "logged in as root")
            step("read build-id", record.markers["shell"] - record.markers["login"], str(record.build_id))
            t0 = time.monotonic()
            rom = lifecycle.usb_boot()
            step("nRPI_BOOT: ROM on USB port", time.monotonic() - t0, f"0a5c:{rom.pid:04x} on {rig.usb_port}")
            state = vrig.module.state
    print(_report(vrig, state), file=sys.stderr)
    print(f"hil: self-test of {rig.name} passed ({sum(steps):.1f} s)", file=sys.stderr)
    return 0
