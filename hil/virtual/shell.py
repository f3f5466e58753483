"""The serial getty, login and a small bash of a virtual module that booted to userspace.

Enough of a shell for a test framework to log in and look at the running system: files come from the
eMMC's root filesystem at the moment they are read, exit statuses behave as in bash (``$?``, ``;``,
``&&``, ``||``), and everything else answers as bash does for a command it does not have.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from hil.errors import HilError, InputError
from hil.image.tools import tool_env
from hil.virtual.firmware import Emit, System

_VARIABLE = re.compile(r"\$(\?|[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})")
HOME = "/root"


@dataclass
class Reply:
    """What the module sends back for one input line, and whether the system then goes down."""

    emits: list[Emit] = field(default_factory=list)
    action: str | None = None  # "poweroff" or "reboot"


class LineEditor:
    """The tty's canonical mode: echo, erase, and whole lines handed to the program reading it."""

    def __init__(self) -> None:
        self._line: list[str] = []
        self._after_cr = False

    def feed(self, data: bytes, echo: bool) -> tuple[str, list[str]]:
        """Typed bytes in; the echo to send and the completed lines out. Ctrl-C completes as "\\x03"."""
        out: list[str] = []
        lines: list[str] = []
        for ch in data.decode("utf-8", "surrogateescape"):
            if ch == "\n" and self._after_cr:
                self._after_cr = False
                continue
            self._after_cr = ch == "\r"
            if ch in "\r\n":
                lines.append("".join(self._line))
                self._line.clear()
                out.append("\n")
            elif ch in "\x7f\x08":
                if self._line:
                    self._line.pop()
                    out.append("\b \b" if echo else "")
            elif ch == "\x03":
                self._line.clear()
                lines.append("\x03")
                out.append("^C\n")
            else:
                self._line.append(ch)
                out.append(ch if echo else "")
        return "".join(out), lines


class Shell:
    def __init__(self, system: System, uptime: Callable[[], float]):
        self.system = system
        self._uptime = uptime  # kernel time, for the kernel's own lines at shutdown
        self._mode = "login"  # "login", "password" or "shell"
        self._status = 0
        self._user = "root"  # who logs in, then who is logged in

    @property
    def logged_in(self) -> bool:
        return self._mode == "shell"

    @property
    def echo(self) -> bool:
        """A password is typed blind."""
        return self._mode != "password"

    def getty(self, delay: float = 0.0) -> list[Emit]:
        """agetty's banner (/etc/issue) and login prompt."""
        return [self._say(delay, f"\n{self.system.issue}{self.system.hostname} login: ")]

    def feed(self, line: str) -> Reply:
        if self._mode == "login":
            return self._login(line)
        if self._mode == "password":
            if _password_matches(line, self._password_field(self._user)):
                return self._logged_in()
            self._mode = "login"
            return Reply([self._say(2.5, "\nLogin incorrect\n"), *self.getty()])
        if line == "\x03":
            self._status = 130
            return Reply([self._say(0.0, self._prompt())])
        return self._run(line)

    # -- login -----------------------------------------------------------------------------------

    def _login(self, line: str) -> Reply:
        user = line.strip()
        if not user or user == "\x03":
            return Reply([self._say(0.0, f"{self.system.hostname} login: ")])
        self._user = user
        if self._password_field(user) == "":  # an empty password field: no password asked
            return self._logged_in()
        self._mode = "password"  # also for a locked or unknown account (*, !): no password will do
        return Reply([self._say(0.05, "Password: ")])

    def _logged_in(self) -> Reply:
        self._mode = "shell"
        self._status = 0
        motd = self._file("/etc/motd") or ""
        s = self.system
        banner = f"Linux {s.hostname} {s.release} {s.version} {s.machine}\n\n{motd}"
        return Reply([self._say(0.4, banner), self._say(0.05, self._prompt())])

    def _password_field(self, user: str) -> str | None:
        for name in ("/etc/shadow", "/etc/passwd"):
            for entry in (self._file(name) or "").splitlines():
                fields = entry.split(":")
                if len(fields) > 1 and fields[0] == user and (name == "/etc/shadow" or fields[1] != "x"):
                    return fields[1]
        return None

    def _file(self, path: str) -> str | None:
        try:
            data = self.system.read(path)
        except HilError:
            return None
        return None if data is None else data.decode("utf-8", "surrogateescape")

    # -- the shell -------------------------------------------------------------------------------

    def _prompt(self) -> str:
        return f"{self._user}@{self.system.hostname}:~{'#' if self._user == 'root' else '$'} "

    def _run(self, line: str) -> Reply:
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:
            self._status = 2
            return Reply([self._say(0.0, "-bash: unexpected EOF while looking for matching quote\n"
                                         + self._prompt())])
        output: list[str] = []
        op = ";"
        argv: list[str] = []
        for token in [*tokens, ";"]:
            if token in (";", "&&", "||"):
                if argv and (op == ";" or (op == "&&") == (self._status == 0)):
                    text, action = self._command(argv)
                    output.append(text)
                    if action:
                        return self._going_down(action, "".join(output))
                    if not self.logged_in:
                        break
                argv, op = [], token
            elif token in ("|", "&", "|&", ";;", "&&&"):
                output.append(f"-bash: '{token}' is not supported by the virtual module's shell\n")
                self._status = 2
                break
            else:
                argv.append(self._expand(token))
        if not self.logged_in:
            return Reply([self._say(0.01, "".join(output)), *self.getty(0.3)])
        return Reply([self._say(0.01, "".join(output) + self._prompt())])

    def _expand(self, word: str) -> str:
        env = {"?": str(self._status), "HOSTNAME": self.system.hostname, "USER": self._user, "HOME": self._home(),
               "SHELL": "/bin/bash"}
        return _VARIABLE.sub(lambda m: env.get(m.group(1).strip("{}"), ""), word)

    def _command(self, argv: list[str]) -> tuple[str, str | None]:
        """Run one simple command: its output and, for poweroff/reboot, what happens next."""
        name, args = argv[0], argv[1:]
        self._status = 0
        if name in ("poweroff", "reboot"):
            return "", name
        if name in ("exit", "logout"):
            self._mode = "login"
            return "logout\n", None
        if name == "true":
            return "", None
        if name == "false":
            self._status = 1
            return "", None
        if name == "echo":
            newline = not (args and args[0] == "-n")
            return " ".join(args[0 if newline else 1:]) + ("\n" if newline else ""), None
        if name == "id" and args == ["-un"]:
            return self._user + "\n", None
        if name == "sudo":
            return self._sudo(args)
        if name == "hostname":
            return self.system.hostname + "\n", None
        if name == "uname":
            return self._uname(args), None
        if name == "cat":
            return self._cat(args), None
        self._status = 127
        return f"-bash: {name}: command not found\n", None

    def _home(self) -> str:
        return HOME if self._user == "root" else f"/home/{self._user}"

    def _sudo(self, args: list[str]) -> tuple[str, str | None]:
        """Root for members of the sudo group (the first user's sudoers entry needs no password)."""
        members = next((line.split(":")[-1].split(",") for line in (self._file("/etc/group") or "").splitlines()
                        if line.startswith("sudo:")), [])
        if self._user != "root" and self._user not in members:
            self._status = 1
            return f"{self._user} is not in the sudoers file.\n", None
        while args and args[0].startswith("-"):  # -n (never ask for a password) and the like change nothing here
            args = args[1:]
        if not args:
            self._status = 1
            return "usage: sudo command\n", None
        user, self._user = self._user, "root"
        try:
            return self._command(args)
        finally:
            self._user = user

    def _uname(self, args: list[str]) -> str:
        s = self.system
        fields = {"s": "Linux", "n": s.hostname, "r": s.release, "v": s.version, "m": s.machine,
                  "o": "GNU/Linux"}
        flags = "".join(a.lstrip("-") for a in args) or "s"
        if "a" in flags:
            flags = "snrvmo"
        unknown = [f for f in flags if f not in fields]
        if unknown:
            self._status = 1
            return f"uname: invalid option -- '{unknown[0]}'\nTry 'uname --help' for more information.\n"
        return " ".join(fields[f] for f in "snrvmo" if f in flags) + "\n"

    def _cat(self, args: list[str]) -> str:
        out = []
        for arg in args:
            path = posixpath.normpath(posixpath.join(self._home(), arg))
            try:
                data = self.system.read(path)
            except InputError as e:
                data = None
                problem = "Is a directory" if "directory" in e.message else "No such file or directory"
            except HilError:
                data, problem = None, "Input/output error"
            else:
                problem = "No such file or directory"
            if data is None:
                self._status = 1
                out.append(f"cat: {arg}: {problem}\n")
            else:
                out.append(data.decode("utf-8", "surrogateescape"))
        return "".join(out)

    def _going_down(self, action: str, before: str) -> Reply:
        """systemd stops everything (its lines only where it reports), then the kernel's last word."""
        emits = [self._say(0.01, before)]
        if self.system.show_status:
            for unit in (f"Session 1 of User {self._user}", "OpenBSD Secure Shell server",
                         f"Serial Getty on {self.system.tty}", "Journal Service"):
                emits.append(self._say(0.3, f"[  OK  ] Stopped {unit}.\n"))
            emits.append(self._say(0.3, f"[  OK  ] Reached target {action}.target - "
                                        f"System {'Power Off' if action == 'poweroff' else 'Reboot'}.\n"))
        last = "Power down" if action == "poweroff" else "Restarting system"
        emits.append(self._say(1.0, f"[{self._uptime() + 1.0:12.6f}] reboot: {last}\n"))
        self._mode = "login"
        return Reply(emits, action)

    def _say(self, delay: float, text: str) -> Emit:
        return Emit(delay, text, self.system.baud)


def _password_matches(password: str, field: str | None) -> bool:
    """``password`` against a crypt(3) SHA-512 field (``$6$salt$hash``); "*", "!..." and others never match."""
    if not field or not field.startswith("$6$") or field.count("$") < 3:
        return False
    salt = field.split("$")[2]
    if salt.startswith("rounds="):
        return False  # not made by openssl passwd -6, which the project's customisation uses
    proc = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input=password.encode(),
                          capture_output=True, env=tool_env(), check=False)
    return proc.returncode == 0 and proc.stdout.decode().strip() == field
