"""The module's serial console (pyserial: device paths and URLs such as ``rfc2217://``).

Opened exclusively and captured by a reader thread from before power-on, so nothing the module prints is
lost while a test is busy elsewhere. Every line is time-stamped and logged; ``expect`` searches the stream
from a cursor with a timeout; forbidden patterns (kernel panic, Oops, ...) fail the next expect as soon as
they appear. A timeout error shows the last lines and where the full log is.
"""

from __future__ import annotations

import bisect
import codecs
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TextIO

import serial

from hil.errors import Fault, HilError, InfrastructureError, ProductError, StageTimeout
from hil.runtime import open_private

_PRINTABLE = re.compile(rb"[\t\r\n\x20-\x7e]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# What a read may end in the middle of: an escape sequence, or the \r of a \r\n.
_UNFINISHED = re.compile(r"(?:\x1b(?:\[[0-9;?]*)?|\r)$")


@dataclass(frozen=True)
class Line:
    t: float  # seconds since the console was opened (monotonic)
    text: str


@dataclass(frozen=True)
class CommandResult:
    command: str
    output: str
    status: int


class Console:
    def __init__(self, device: str, baud: int = 115200, *, log_path: Path | None = None,
                 forbidden: Sequence[str] = (), name: str = "console"):
        self.device, self.baud, self.name = device, baud, name
        self.log_path = log_path
        self._forbidden = [re.compile(p) for p in forbidden]
        self._cond = threading.Condition()
        self._text = ""  # everything received, decoded
        self._arrivals: list[tuple[int, float]] = []  # (offset in _text, seconds since open) per chunk
        self._listener: Callable[[bytes], None] | None = None
        self._cursor = 0  # expect() searches from here
        self._lines: list[Line] = []
        self._partial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two reads
        self._carry = ""  # an unfinished escape sequence or \r\n, kept for the next read
        self._violation: str | None = None
        self._failure: HilError | None = None
        self._garbage = 0
        self._received = 0
        self._port: serial.SerialBase | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._log: TextIO | None = None

    # lifetime -------------------------------------------------------------------------------------------
    def open(self) -> Console:
        try:
            if "://" in self.device:
                port = serial.serial_for_url(self.device, baudrate=self.baud, timeout=0.05)
            else:
                port = serial.Serial(self.device, self.baud, timeout=0.05, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as e:
            raise InfrastructureError(
                f"cannot open the console {self.device}: {e}; check the USB-serial adapter and that no other "
                "program (screen, minicom, another test) has it open", stage="console.open") from e
        self._port = port
        self._t0 = time.monotonic()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # 0600: the log holds the module's login session
            self._log = os.fdopen(open_private(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a",
                                  encoding="utf-8")
        self._thread = threading.Thread(target=self._reader, name=f"{self.name}-reader", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._port is not None:
            self._port.close()
            self._port = None
        with self._cond:
            self._flush_partial()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Console:
        return self.open()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # capture --------------------------------------------------------------------------------------------
    def _reader(self) -> None:
        assert self._port is not None
        while not self._stop.is_set():
            try:
                data = self._port.read(4096)
            except (serial.SerialException, OSError) as e:
                with self._cond:
                    self._failure = InfrastructureError(
                        f"the console {self.device} went away ({e}): USB-serial adapter unplugged or its "
                        "cable loose", stage="console.read", log=str(self.log_path))
                    self._cond.notify_all()
                return
            if data:
                self._feed(data)

    def on_receive(self, callback: Callable[[bytes], None] | None) -> None:
        """Also hand every chunk received to ``callback`` (from the reader thread), e.g. to show it live."""
        self._listener = callback

    def _feed(self, data: bytes) -> None:
        listener = self._listener
        if listener is not None:
            listener(data)
        self._received += len(data)
        self._garbage += len(data) - len(_PRINTABLE.findall(data))
        raw = self._carry + self._decoder.decode(data)
        unfinished = _UNFINISHED.search(raw)
        self._carry = raw[unfinished.start():] if unfinished else ""
        raw = raw[:unfinished.start()] if unfinished else raw
        text = _ANSI.sub("", raw.replace("\r\n", "\n").replace("\r", "\n"))
        with self._cond:
            self._arrivals.append((len(self._text), self.now()))
            self._text += text
            self._partial += text
            *complete, self._partial = self._partial.split("\n")
            for line in complete:
                self._add_line(line)
            self._cond.notify_all()

    def _add_line(self, text: str) -> None:
        line = Line(time.monotonic() - self._t0, text)
        self._lines.append(line)
        if self._log is not None:
            self._log.write(f"[{line.t:10.3f}] {text}\n")
            self._log.flush()
        if self._violation is None:
            for pattern in self._forbidden:
                if pattern.search(text):
                    self._violation = text
                    break

    def _flush_partial(self) -> None:
        if self._partial:
            self._add_line(self._partial)
            self._partial = ""

    # reading --------------------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the console was opened: the time base of lines and :meth:`arrival`."""
        return time.monotonic() - self._t0

    def arrival(self, match: re.Match[str]) -> float:
        """When the text a match of :meth:`expect` ends with arrived (seconds since open)."""
        with self._cond:
            i = bisect.bisect_right(self._arrivals, (max(match.end() - 1, 0), float("inf"))) - 1
            return self._arrivals[i][1] if i >= 0 else 0.0

    @property
    def received(self) -> int:
        """Bytes received since the last :meth:`skip_pending` (or open)."""
        return self._received

    @property
    def lines(self) -> list[Line]:
        with self._cond:
            return list(self._lines)

    def mark(self) -> int:
        """A position in the line log, for slicing out what one step printed."""
        with self._cond:
            return len(self._lines)

    def since(self, mark: int) -> str:
        with self._cond:
            return "\n".join(f"[{x.t:10.3f}] {x.text}" for x in self._lines[mark:])

    def tail(self, n: int = 15) -> str:
        with self._cond:
            shown = [f"[{x.t:10.3f}] {x.text}" for x in self._lines[-n:]]
            if self._partial:
                shown.append(f"[   partial  ] {self._partial}")
        return "\n".join(shown) if shown else "(nothing received)"

    def skip_pending(self) -> None:
        """Forget what arrived so far (forbidden lines included): the next expect only sees new output."""
        with self._cond:
            self._cursor = len(self._text)
            self._violation = None
            self._garbage = self._received = 0

    def expect(self, pattern: str | re.Pattern[str], timeout: float, *, stage: str,
               fault: Fault = Fault.PRODUCT, what: str = "") -> re.Match[str]:
        """Wait until ``pattern`` appears after the cursor; the cursor then moves past the match.

        A timeout is blamed on ``fault``, except when nothing at all arrived or only garbage did, which points
        at the console itself (cable, adapter, baud rate).
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._raise_pending(stage)
                m = regex.search(self._text, self._cursor)
                if m:
                    self._cursor = m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        raise self._timeout(regex.pattern, timeout, stage, fault, what)

    def _raise_pending(self, stage: str) -> None:
        if self._failure is not None:
            raise InfrastructureError(self._failure.message, stage=stage, log=str(self.log_path), tail=self.tail())
        if self._violation is not None:
            line, self._violation = self._violation, None
            raise ProductError(f"the console showed a forbidden line: {line.strip()!r}", stage=stage,
                               line=line, log=str(self.log_path), tail=self.tail())

    def _timeout(self, pattern: str, timeout: float, stage: str, fault: Fault, what: str) -> HilError:
        where = f" (full log: {self.log_path})" if self.log_path else ""
        waited = what or repr(pattern)
        if self._received and self._garbage > 0.3 * self._received:
            return InfrastructureError(
                f"no {waited} within {timeout:g} s, and {self._garbage} of {self._received} bytes received were "
                f"garbage: check the console's baud rate ({self.baud}) and wiring{where}\nlast lines:\n{self.tail()}",
                stage=stage, log=str(self.log_path))
        return StageTimeout(f"no {waited} on the console within {timeout:g} s{where}\nlast lines:\n{self.tail()}",
                            stage=stage, fault=fault, log=str(self.log_path), tail=self.tail())

    # writing --------------------------------------------------------------------------------------------
    @property
    def failure(self) -> HilError | None:
        """Why the console stopped capturing (adapter gone), or None while it works."""
        return self._failure

    def send(self, text: str | bytes) -> None:
        if self._port is None:
            raise InfrastructureError("the console is not open", stage="console.write")
        try:
            self._port.write(text.encode() if isinstance(text, str) else text)
            self._port.flush()
        except (serial.SerialException, OSError) as e:
            raise InfrastructureError(f"cannot write to the console {self.device}: {e}",
                                      stage="console.write") from e

    def send_line(self, text: str) -> None:
        self.send(text + "\n")

    # shell ----------------------------------------------------------------------------------------------
    def login(self, user: str = "root", password: str | None = None, *, timeout: float = 30.0,
              login_prompt: str = r"login: ?$", shell_prompt: str = r"[#$] ?$", prompt_seen: bool = False) -> None:
        """Answer a login prompt that is already on screen or about to be.

        ``prompt_seen``: the caller's own expect already consumed the prompt (e.g. to time it)."""
        if not prompt_seen:
            self.expect(login_prompt, timeout, stage="console.login", what="login prompt")
        self.send_line(user)
        if password is not None:
            self.expect(r"[Pp]assword: ?$", timeout, stage="console.login", what="password prompt")
            self.send_line(password)
        prompt = self.expect(shell_prompt, timeout, stage="console.login", what="shell prompt after login")
        self.shell_prompt = shell_prompt
        with self._cond:  # what stands before the prompt's end ("root@host:~"), to cut it off command output
            self._prompt_lead = self._text[self._text.rfind("\n", 0, prompt.start()) + 1:prompt.start()]

    shell_prompt = r"[#$] ?$"
    _prompt_lead = ""

    def run(self, command: str, *, timeout: float = 30.0) -> CommandResult:
        """Run one shell command after login; returns its output and exit status."""
        stage = "console.command"
        self.skip_pending()
        self.send_line(command)
        echoed = self.expect(re.escape(command) + r"\n", timeout, stage=stage, what=f"echo of {command!r}")
        start = echoed.end()
        prompt = self.expect(self.shell_prompt, timeout, stage=stage, what=f"prompt after {command!r}")
        with self._cond:
            output = self._text[start:prompt.start()]
        if self._prompt_lead and output.endswith(self._prompt_lead):
            output = output[:-len(self._prompt_lead)]
        elif "\n" in output:  # a prompt that changed (cd): drop its line
            output = output.rsplit("\n", 1)[0] + "\n"
        output = output.removesuffix("\n")
        self.send_line("echo $?")
        status = self.expect(r"echo \$\?\n(\d+)\n", timeout, stage=stage, what="exit status")
        self.expect(self.shell_prompt, timeout, stage=stage, what="prompt after exit status")
        return CommandResult(command, output, int(status.group(1)))
