"""``hil console``: the terminal passed through to the module's console, Ctrl-] to quit."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable
from typing import Any

from hil.rig import Rig
from tests.hilrun import hil_command


def read_until(proc: subprocess.Popen[bytes], marker: bytes, seen: bytearray, timeout: float = 10.0) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} from hil console; got:\n{seen.decode(errors='replace')[-2000:]}"
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"hil console ended early; got:\n{seen.decode(errors='replace')[-2000:]}"
            seen += chunk


def test_interactive_console_logs_in_and_quits_on_ctrl_bracket(make_rig: Callable[..., Rig],
                                                                bench: Callable[..., Any]) -> None:
    rig = make_rig("cm4", name="rc-console")
    assert rig.virtual is not None
    rig.virtual.state_dir.mkdir(parents=True, exist_ok=True)
    (rig.virtual.state_dir / "emmc.img").write_bytes(bench("cm4").image("typed-1").path.read_bytes())
    argv, env = hil_command("console", "--rig", str(rig.path), "--power-on")
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    seen = bytearray()
    try:
        read_until(proc, b"login: ", seen)
        proc.stdin.write(b"root\r")
        proc.stdin.flush()
        read_until(proc, b":~# ", seen)
        proc.stdin.write(b"cat /etc/build-id\r")
        proc.stdin.flush()
        read_until(proc, b"typed-1\r\n", seen)
        proc.stdin.write(b"\x1d")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
