"""The virtual rig as a rig body (``cm_hil.rig_bodies`` entry point ``virtual``): what :class:`hil.session.RigSession`
calls so that every command and the pytest plugin drive a virtual rig as written, without importing this package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hil.errors import InfrastructureError, InputError
from hil.hostenv import umockdev_active
from hil.rig import Rig
from hil.virtual.usb.kernel_bus import kernel_transport

if TYPE_CHECKING:
    from hil.virtual.rig import VirtualRig


def ensure_umockdev(argv: Sequence[str]) -> None:
    """Re-run this command under umockdev-wrapper, so libusb and udev see the virtual USB devices."""
    if umockdev_active() or kernel_transport():
        return
    wrapper = shutil.which("umockdev-wrapper")
    if wrapper is None:
        raise InfrastructureError("umockdev-wrapper is not installed; run ./setup.sh", stage="virtual")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(wrapper, [wrapper, sys.executable, "-m", "hil.cli", *argv])


def _needs_guest(rig: Rig, transport: str | None) -> bool:
    """The rig (or ``transport``, asked for over the rig file's) is on the kernel transport and this process is
    not yet in its guest."""
    assert rig.virtual is not None
    return (transport or rig.virtual.transport) == "kernel" and not kernel_transport()


class VirtualBody:
    """Claims the rigs with a ``[virtual]`` section and brings their simulated module up for a session."""

    def claims(self, rig: Rig) -> bool:
        return rig.virtual is not None

    def prepare(self, rig: Rig, rerun: Sequence[str] | None) -> None:
        if _needs_guest(rig, None):
            if rerun is None:
                raise InputError(f"{rig.path} puts the module on the kernel USB transport, which runs in a QEMU "
                                 "guest; give pytest the rig with --rig, and the run moves there", stage="virtual")
            code = self.rerun_elsewhere(rig, ["-m", "hil.cli", *rerun], None)
            raise SystemExit(code)  # the whole command ran in the guest; nothing of it here
        if rerun is not None:
            ensure_umockdev(rerun)

    def rerun_elsewhere(self, rig: Rig, argv: Sequence[str], transport: str | None) -> int | None:
        """On the kernel transport, the whole command runs in the QEMU guest (:mod:`hil.virtual.guest`)."""
        if not _needs_guest(rig, transport):
            return None
        from hil.virtual.guest.vm import run_python

        sys.stdout.flush()
        return run_python(argv)

    @contextlib.contextmanager
    def bring_up(self, rig: Rig) -> Iterator[VirtualRig]:
        """The rig's virtual module for the session; one this process already runs (a test opened it) is
        used as it is and left running."""
        from hil.virtual.rig import VirtualRig  # the simulated module's imports, only once a session opens

        try:
            running: VirtualRig | None = VirtualRig.running(rig.name)
        except InfrastructureError:
            running = None
        if running is not None:
            yield running
            return
        with VirtualRig(rig) as vrig:
            yield vrig

    def stand_in_payload(self, rig: Rig, folder: Path, purpose: str) -> Path | None:
        from hil.virtual.usb.payloads import make_payload

        if purpose == "recovery":
            if not rig.model.has_eeprom:
                return None
            kind = "recovery" if rig.model.chip_dir == "2711" else "recovery5"
        else:
            kind = "msd" if rig.model.chip_dir == "2710" else "mass-storage-gadget64"
        return make_payload(folder, kind, (rig.model.name,))
