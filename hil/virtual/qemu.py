"""The virtual CM3 booting its eMMC with a real Linux kernel under QEMU (rig file: ``boot_engine = "qemu"``).

The simulated boot of :mod:`hil.virtual.firmware` proves that the framework reads a console; this proves that
the bytes it wrote are a bootable system. The rig plays the CM3's GPU firmware (:func:`hand_over`): from the
eMMC image's FAT partition it reads config.txt and cmdline.txt and takes the kernel, device tree and
initramfs they name, then :class:`QemuBoot` runs them on ``qemu-system-aarch64 -M raspi3b`` (the CM3's
BCM2837; the CM3 device tree comes from the image) with the eMMC image file as its SD card. What QEMU writes
lands in the eMMC, as a running module's writes do.

QEMU's UART is a socket pair bridged byte for byte onto the rig's :class:`VirtualConsole`, whose pty keeps its
published path across power cycles, as a USB-serial adapter's by-id name does. QEMU starts paused (``-S``)
and runs (QMP ``cont``) only once the bridge is up, so no early output is lost. Power-off ends it by its PID:
QMP ``quit``, then SIGTERM, then SIGKILL; ``setpriv --pdeathsig`` takes it down with the thread that started
it, should the whole test process die. Verified settings and pitfalls: virtual-rig-substrate.md part 2
(single-threaded TCG: raspi3b has 4 vCPUs and multi-threaded TCG on a 2-core host is several times slower).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hil.errors import InfrastructureError
from hil.image.bootfs import boot_files
from hil.image.tools import tool_env
from hil.models import ModuleModel
from hil.virtual import firmware
from hil.virtual.console import VirtualConsole
from hil.virtual.journal import Journal

STAGE = "virtual.qemu"
QEMU = "qemu-system-aarch64"
MODELS = ("cm3", "cm3+")  # raspi3b is a BCM2837; QEMU 7.2 has no BCM2711 or BCM2712 machine
QMP_TIMEOUT = 10.0  # s for QEMU to answer on its control socket
QUIT_WAIT = 2.0  # s after QMP quit, then after SIGTERM, before the next, harder step
_TAIL = 512  # bytes of UART output kept to tell a guest reboot from a poweroff
_INITRAMFS_LINE = re.compile(r"^(\s*)initramfs\s+(\S+).*$", re.MULTILINE)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handover:
    """What the GPU firmware hands the ARM cores: files read from the boot partition, and the command line."""

    kernel: bytes
    dtb: bytes
    initramfs: bytes | None
    cmdline: str
    uart: bool  # enable_uart: without it nothing of the kernel's reaches the console pins


def check_host() -> None:
    """QEMU and setpriv are on this host; else the rig, not the module, is at fault."""
    for tool, package in ((QEMU, "qemu-system-arm"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            raise InfrastructureError(f"{tool} not found, so a virtual CM3 with boot_engine = \"qemu\" cannot boot. "
                                      f"Fix: apt-get install --no-install-recommends {package}", stage=STAGE)


def hand_over(model: ModuleModel, image: Path) -> Handover | firmware.UsbFallback | firmware.Stuck:
    """The CM3 boot ROM and GPU firmware on the eMMC ``image``, as far as they go before the kernel.

    As on the module: no bootcode.bin sends the ROM to USB boot; no GPU firmware, kernel or device tree
    stops the boot silently. ``initramfs NAME`` and ``auto_initramfs=1`` load an initramfs, and the firmware's
    ``console=serial0`` becomes the real UART. Overlays and dtparams are not applied (QEMU has no GPU firmware).
    """
    disk = firmware.BootDisk(image)
    files = boot_files(model.name)
    if disk.boot_file(files.firmware[0]) is None:
        return firmware.UsbFallback()
    if any(disk.boot_file(name) is None for name in files.firmware[1:]):
        return firmware.Stuck("bootcode.bin found no GPU firmware")
    text = (disk.boot_file("config.txt") or b"").decode("utf-8", "replace")
    config = firmware.BootConfig.parse(_INITRAMFS_LINE.sub(r"\1initramfs=\2", text), model.name)
    chip = firmware.CHIPS[model.name]
    kernel_name = firmware.kernel_name(model, chip, config)
    kernel = disk.boot_file(kernel_name)
    dtb_name = config.get("device_tree", files.dtb)
    dtb = disk.boot_file(dtb_name)
    if not kernel:
        return firmware.Stuck(f"no {kernel_name} on the boot partition")
    if dtb is None or firmware.fdt_model(dtb) is None:
        return firmware.Stuck(f"{dtb_name} is missing or not a device tree")
    initramfs_name = config.get("initramfs")
    if not initramfs_name and config.flag("auto_initramfs") and kernel_name.startswith("kernel"):
        initramfs_name = "initramfs" + kernel_name.removeprefix("kernel").removesuffix(".img")
    initramfs = disk.boot_file(initramfs_name) if initramfs_name else None
    line = (disk.boot_file(config.get("cmdline", "cmdline.txt")) or b"").decode("utf-8", "replace")
    args = firmware.kernel_args(line.split("\n", 1)[0].strip(), chip.serial0)
    cmdline = " ".join(f"{k}={v}" if v is not None else k for k, v in args)
    return Handover(kernel, dtb, initramfs, cmdline, config.flag("enable_uart"))


class _Qmp:
    """QEMU's JSON control protocol over a socket: commands answered in order, events skipped."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(QMP_TIMEOUT)
        self._sock = sock
        self._file = sock.makefile("rwb")

    def handshake(self) -> None:
        self._message()  # the greeting
        self.command("qmp_capabilities")

    def command(self, name: str) -> dict[str, Any]:
        self._file.write(json.dumps({"execute": name}).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._message()
            if "error" in reply:
                raise InfrastructureError(f"QEMU refused {name}: {reply['error']}", stage=STAGE)
            if "return" in reply:
                return reply

    def send(self, name: str) -> None:
        """A command whose answer may never come (``quit``)."""
        self._file.write(json.dumps({"execute": name}).encode() + b"\n")
        self._file.flush()

    def _message(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise EOFError("QEMU closed its control socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()


class QemuBoot:
    """One power-on of the virtual CM3 from its eMMC: QEMU runs until :meth:`stop` or until the guest ends it.

    ``on_login`` is called (from the bridge's thread) when the ``login`` pattern first shows on the UART.
    """

    def __init__(self, image: Path, handover: Handover, console: VirtualConsole, journal: Journal, *,
                 login: str, on_login: Callable[[], None]):
        self.image = image
        self.handover = handover
        self.console = console
        self.journal = journal
        self.pid: int | None = None
        self._login = re.compile(login, re.MULTILINE)
        self._on_login = on_login
        self._proc: subprocess.Popen[bytes] | None = None
        self._uart: socket.socket | None = None
        self._qmp: _Qmp | None = None
        self._stderr: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tail = b""
        self._stop_lock = threading.Lock()
        self._stopped = False  # power went: a start still under way must not leave a QEMU behind

    def start(self) -> None:
        """Start QEMU paused, bridge its UART, then let it run; a failure leaves no process behind."""
        try:
            self._start()
        except BaseException as e:
            cut = self._stopped  # power went while QEMU was starting: not a failure
            self.stop()
            if cut and isinstance(e, Exception):
                return
            log.warning("the virtual CM3's QEMU did not start: %s", e)
            raise

    def _start(self) -> None:
        with contextlib.ExitStack() as lent:  # QEMU's ends of the sockets and its files: its own copies remain
            files = [self._memfd(lent, "kernel", self.handover.kernel), self._memfd(lent, "dtb", self.handover.dtb)]
            if self.handover.initramfs is not None:
                files.append(self._memfd(lent, "initramfs", self.handover.initramfs))
            self._uart, uart_qemu = socket.socketpair()
            lent.callback(uart_qemu.close)
            qmp_host, qmp_qemu = socket.socketpair()
            lent.callback(qmp_qemu.close)
            self._qmp = _Qmp(qmp_host)
            argv = ["setpriv", "--pdeathsig", "KILL", QEMU, "-M", "raspi3b", "-accel", "tcg,thread=single",
                    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
                    "-kernel", f"/dev/fd/{files[0]}", "-dtb", f"/dev/fd/{files[1]}",
                    *(["-initrd", f"/dev/fd/{files[2]}"] if len(files) > 2 else []),
                    "-append", self.handover.cmdline,
                    "-drive", f"file={str(self.image).replace(',', ',,')},if=sd,format=raw",
                    "-chardev", f"socket,id=uart0,fd={uart_qemu.fileno()}",
                    "-serial", "chardev:uart0" if self.handover.uart else "null",
                    "-chardev", f"socket,id=qmp,fd={qmp_qemu.fileno()}", "-mon", "chardev=qmp,mode=control"]
            with self._stop_lock:
                if self._stopped:
                    return
                self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - QEMU's messages, read if it fails
                proc = subprocess.Popen(argv, pass_fds=[uart_qemu.fileno(), qmp_qemu.fileno(), *files],
                                        stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                                        env=tool_env(), start_new_session=True)
                self._proc, self.pid = proc, proc.pid
        try:
            self._qmp.handshake()
        except (OSError, EOFError, ValueError) as e:
            raise InfrastructureError(f"QEMU (pid {self.pid}) did not start its control socket ({e}): "
                                      f"{self._messages()}", stage=STAGE, argv=argv) from None
        self._reader = threading.Thread(target=self._bridge, name=f"qemu-uart {self.pid}", daemon=True)
        self._reader.start()
        self.journal.record("qemu", "started", pid=self.pid, image=str(self.image), cmdline=self.handover.cmdline,
                            initramfs=self.handover.initramfs is not None, uart=self.handover.uart)
        try:
            self._qmp.command("cont")
        except (OSError, EOFError, ValueError) as e:
            raise InfrastructureError(f"QEMU (pid {self.pid}) did not start running ({e}): {self._messages()}",
                                      stage=STAGE) from None

    @staticmethod
    def _memfd(lent: contextlib.ExitStack, name: str, data: bytes) -> int:
        """A file QEMU opens as /dev/fd/N: nothing on disk to clean up, whatever happens to this process."""
        fd = os.memfd_create(name)
        lent.callback(os.close, fd)
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        return fd

    def _bridge(self) -> None:
        """Everything QEMU's UART sends, onto the console (until QEMU closes its end)."""
        assert self._uart is not None
        login_seen = False
        while True:
            try:
                data = self._uart.recv(4096)
            except OSError:
                return
            if not data:
                return
            if self._stopped:  # the power is cut: the UART goes quiet at once, as the real one does
                return
            self.console.write(data)
            self._tail = (self._tail + data)[-_TAIL:]
            if not login_seen and self._login.search(self._tail.decode("utf-8", "replace")):
                login_seen = True
                self._on_login()

    def send(self, data: bytes) -> None:
        """What the host types on the console, to the guest's UART (QEMU reads it as the UART has room)."""
        uart = self._uart
        if uart is not None:
            with contextlib.suppress(OSError):
                uart.sendall(data)

    def wait(self, cancel: threading.Event) -> str | None:
        """Until QEMU ends by itself ("reboot" or "halt", as the guest asked) or ``cancel`` is set (None)."""
        while not cancel.wait(0.05):
            proc = self._proc
            if proc is None:  # stopped before it ran
                return None
            if proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=2.0)  # the last words before the exit
                return "reboot" if b"reboot: Restarting system" in self._tail else "halt"
        return None

    def stop(self) -> None:
        """Power off: QMP quit, then SIGTERM, then SIGKILL, to this QEMU's PID only. Safe to call again."""
        with self._stop_lock:
            self._stopped = True
            proc, self._proc = self._proc, None
            how = "exited"
            if proc is not None and proc.poll() is None:
                how = self._end(proc)
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            if self._uart is not None:
                with contextlib.suppress(OSError):
                    self._uart.shutdown(socket.SHUT_RDWR)  # wakes the bridge, should QEMU's end linger
                self._uart.close()
                self._uart = None
            if self._reader is not None and self._reader is not threading.current_thread():
                self._reader.join(timeout=2.0)
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
            if proc is not None:
                self.journal.record("qemu", "stopped", pid=proc.pid, how=how, returncode=proc.returncode)

    def _end(self, proc: subprocess.Popen[bytes]) -> str:
        if self._qmp is not None:
            with contextlib.suppress(OSError):
                self._qmp.send("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(QUIT_WAIT)
                return "quit"
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(QUIT_WAIT)
            return "SIGTERM"
        proc.kill()
        proc.wait()
        return "SIGKILL"

    def _messages(self) -> str:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(1.0)
        if self._stderr is None:
            return "(no output)"
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return text[-2000:] or "(no output)"
