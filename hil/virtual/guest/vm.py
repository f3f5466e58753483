"""Run one program in the kernel-transport guest: QEMU (TCG, one vCPU) boots the kit's kernel, which mounts the
host's root read-only and the job's folders read-write over 9p, loads dummy_hcd with ``buses`` buses, traces
every bus with usbmon and runs the program as root in the host's root. The program's output is the guest's
console; its exit code, the usbmon trace and the kernel log come back in the job folder.

Writes reach the host only in the shared folders (the project, the working folder, the image cache, the virtual
rigs' state, the HIL_* folders, the folders of paths on the command line and any ``shares`` given); everything
else the guest writes lands in its own tmpfs and is gone when it powers off.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hil.errors import InfrastructureError
from hil.flash.cache import default_root
from hil.hostenv import outside_umockdev
from hil.rig import default_state_root
from hil.runtime import default_runtime_dir, private_dir
from hil.virtual.guest.kit import STAGE, kernel_kit

PR_SET_PDEATHSIG = 1
MEMORY_MIB = 1536
#: Passed into the guest; everything else of the host's environment stays outside.
ENV_PASSED = ("TERM", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "COLUMNS", "NO_COLOR")
ENV_PREFIXES = ("HIL_",)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class GuestJob:
    argv: Sequence[str]
    cwd: Path = field(default_factory=Path.cwd)
    shares: Sequence[Path] = ()  # more folders the program may write
    buses: int = 4  # dummy_hcd instances: usb1 .. usbN, one root port each
    terminal: bool = field(default_factory=sys.stdout.isatty)  # the program's output is a terminal (else a pipe)
    timeout: float = 1800.0


@dataclass(frozen=True)
class GuestResult:
    exit_code: int
    seconds: float
    folder: Path  # the job folder: usbmon.txt (every bus, the whole run), dmesg.txt

    @property
    def usbmon(self) -> Path:
        return self.folder / "usbmon.txt"

    @property
    def dmesg(self) -> Path:
        return self.folder / "dmesg.txt"


def project_root() -> Path:
    return Path(__file__).resolve().parents[3]


def kept_folders() -> list[Path]:
    """The image cache and the virtual rigs' state (their defaults or HIL_CACHE_DIR/HIL_STATE_DIR), made if
    missing: shared, so a run in the guest keeps them."""
    folders = [default_root(), default_state_root()]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folders


def run_python(argv: Sequence[str], shares: Sequence[Path] = ()) -> int:
    """``python ARGV...`` (this Python) in the guest, its usbmon trace and kernel log named on stderr; its exit
    code."""
    result = run(GuestJob([sys.executable, *argv], shares=shares))
    lines = result.usbmon.read_text(errors="replace").count("\n") if result.usbmon.exists() else 0
    print(f"hil: guest ran {result.seconds:.1f} s, exit {result.exit_code}; usbmon trace ({lines} lines) "
          f"{result.usbmon}, kernel log {result.dmesg}", file=sys.stderr)
    return result.exit_code


def qemu() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise InfrastructureError("qemu-system-x86_64 is not installed; the kernel USB transport runs in a QEMU "
                                  "guest. Fix: run ./setup.sh (Debian package qemu-system-x86)", stage=STAGE)
    return found


def writable_shares(job: GuestJob) -> list[Path]:
    """The folders the guest may write: the project, the working folder, the HIL_* folders, the job's own;
    nested ones are covered by their parent's share."""
    wanted = [project_root(), job.cwd, *kept_folders(), *job.shares, *named_folders(job.argv)]
    for name, value in os.environ.items():
        if name.startswith("HIL_") and name.endswith("_DIR") and value and name != "HIL_RUNTIME_DIR":
            wanted.append(Path(value))
    found: list[Path] = []
    for path in sorted({p.resolve() for p in wanted if p.is_dir()}):
        if path == Path("/") or any(path.is_relative_to(done) for done in found):
            continue
        found.append(path)
    return found


def named_folders(argv: Sequence[str]) -> list[Path]:
    """The folders of the paths a command names (``IMG``, ``--out=DIR/x``): the guest's own /tmp hides the
    host's, so a file there is only seen through a share."""
    found = []
    for arg in argv[1:]:
        for text in (arg, arg.partition("=")[2]):
            if not text or text.startswith("-"):
                continue
            path = Path(text).absolute()
            if path.is_dir():
                found.append(path)
            elif path.parent.is_dir() and path.parent != Path("/"):
                found.append(path.parent)
    return found


def job_script(job: GuestJob) -> str:
    env = {k: v for k, v in os.environ.items() if k in ENV_PASSED or k.startswith(ENV_PREFIXES)}
    env.pop("HIL_RUNTIME_DIR", None)  # the host's runtime folder is not shared; the guest has its own /run
    env.update({"PATH": PATH, "HOME": str(Path.home()), "HIL_USB_TRANSPORT": "kernel", "PAGER": "cat",
                "SYSTEMD_PAGER": "cat"})
    lines = ["set -e"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines += [
        # udev as on a host: rules, hwdb and the ID_* properties programs look up (when the host has udev)
        "if [ -x /lib/systemd/systemd-udevd ]; then",
        "  /lib/systemd/systemd-udevd --daemon --resolve-names=never 2>/dev/null",
        "  udevadm trigger --action=add >/dev/null 2>&1 || true; udevadm settle -t 10 || true",
        "fi",
        f"cd {shlex.quote(str(job.cwd))}",
        "set +e",
    ]
    if job.terminal:
        lines.append(shlex.join(job.argv))
    else:  # the program's output through a pipe, as it would be here: no pager, no colours, no progress bar
        lines += ["mkfifo /tmp/hil-out", "cat /tmp/hil-out >/dev/console &",
                  f"{shlex.join(job.argv)} >/tmp/hil-out 2>&1", "code=$?", "wait", "exit $code"]
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    """In QEMU's process before it starts: killed when the process that started it dies (a CI job's timeout
    kills hil, and a guest left running would hold a core for good)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run(job: GuestJob) -> GuestResult:
    """Boot the guest, run ``job`` in it and power it off; the guest's console (the program's output) is this
    process's stdout."""
    kit = kernel_kit()
    folder = private_dir(default_runtime_dir() / f"guest-{os.getpid()}-{time.monotonic_ns()}")
    shares = writable_shares(job)
    (folder / "shares").write_text("".join(f"rw{i} {p}\n" for i, p in enumerate(shares)))
    (folder / "job").write_text(job_script(job))
    (folder / "dummy_hcd").write_text(f"num={max(1, job.buses)}\n")
    # -cpu max: QEMU's default CPU has no SSE4.2/AVX, and NumPy's wheels (matplotlib, for the matrix picture)
    # die on an illegal instruction without them
    argv = [qemu(), "-accel", "tcg", "-cpu", "max", "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kit.kernel),
            "-initrd", str(kit.initramfs),
            "-append", "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init",
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={folder},mount_tag=hilx,security_model=none,multidevs=remap"]
    for i, path in enumerate(shares):
        argv += ["-virtfs", f"local,path={path},mount_tag=rw{i},security_model=none,multidevs=remap"]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=sys.stdout.fileno(), stderr=subprocess.PIPE,
                              timeout=job.timeout, check=False, env=outside_umockdev(), preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"the guest did not power off within {job.timeout:.0f} s; its job folder is "
                                  f"{folder}", stage=STAGE, folder=str(folder)) from None
    seconds = time.monotonic() - started
    code_file = folder / "exit"
    if not code_file.exists():
        raise InfrastructureError(f"the guest stopped before its job ended (QEMU exit {proc.returncode}: "
                                  f"{proc.stderr.decode(errors='replace').strip()[-400:]}); its job folder is "
                                  f"{folder}", stage=STAGE, folder=str(folder))
    return GuestResult(int(code_file.read_text().strip() or 1), seconds, folder)
