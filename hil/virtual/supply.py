"""A virtual rig powered like a real one without relays: through a uhubctl hub port, or through commands.

:class:`SupplyServer` is the module's supply switch: a Unix socket in the rig's private runtime folder that
the ``hil-virtual-uhubctl`` program (:func:`main`, installed as a console script) talks to. That program
takes uhubctl's own arguments (``-l HUB -p PORT [-a on|off]``) and prints what uhubctl prints, so the rig
file's ``[power] backend = "uhubctl"`` (with ``program = "hil-virtual-uhubctl"``) or a ``backend = "command"``
whose commands call it drive the virtual module exactly as the real programs drive a hub or a smart plug.

While a rig with such a supply is open, its process environment names the socket (``HIL_VIRTUAL_SUPPLY``)
and puts the installed scripts' folder first on PATH, so the power backend's child finds both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path

from hil.rig import Rig

ENV = "HIL_VIRTUAL_SUPPLY"
PROGRAM = "hil-virtual-uhubctl"
HUB_DESCRIPTION = "[2109:3431 USB2.0 Hub (cm-hil virtual), USB 2.10, 4 ports, ppps]"


def port_status(port: int, on: bool) -> str:
    """uhubctl's line for one port: ``0100 power`` when switched on, ``0000 off`` when off (uhubctl README)."""
    return f"  Port {port}: 0100 power" if on else f"  Port {port}: 0000 off"


class SupplyServer:
    """Serves ``on``/``off``/``status`` requests for one hub port; ``switch(on)`` applies power to the module."""

    def __init__(self, folder: Path, hub: str | None, port: int | None, switch: Callable[[bool], None]):
        self.path = folder / "supply.sock"
        self.hub, self.port = hub, port
        self.switch = switch
        self.on = False
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._saved: dict[str, str | None] = {}

    def open(self) -> SupplyServer:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(4)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="virtual-supply", daemon=True)
        self._thread.start()
        scripts = sysconfig.get_path("scripts")
        for key, value in ((ENV, str(self.path)), ("PATH", f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}")):
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def close(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    request = json.loads(conn.makefile("r").readline())
                    reply = self.handle(str(request.get("hub")), int(request.get("port")), request.get("action"))
                except (ValueError, TypeError) as e:
                    reply = {"code": 1, "text": f"bad request: {e}\n"}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def handle(self, hub: str, port: int, action: str | None) -> dict[str, object]:
        """What uhubctl would print for ``-l hub -p port [-a action]``, and its exit status."""
        if self.hub is not None and (hub != self.hub or port != self.port):
            return {"code": 1, "text": f"No compatible devices detected at location {hub} port {port}!\n"
                                       f"(the virtual hub is {self.hub}, its module on port {self.port})\n"}
        lines = [f"Current status for hub {hub} {HUB_DESCRIPTION}", port_status(port, self.on)]
        if action in ("on", "off", "1", "0"):
            want = action in ("on", "1")
            lines.append(f"Sent power {'on' if want else 'off'} request")
            self.switch(want)
            self.on = want
            lines += [f"New status for hub {hub} {HUB_DESCRIPTION}", port_status(port, self.on)]
        elif action is not None:
            return {"code": 1, "text": f"Invalid action {action!r}: use on or off\n"}
        return {"code": 0, "text": "\n".join(lines) + "\n"}


def main(argv: list[str] | None = None) -> int:
    """``hil-virtual-uhubctl -l HUB -p PORT [-a on|off]``: uhubctl for the virtual rig open in the calling
    process (the one that named its supply in HIL_VIRTUAL_SUPPLY)."""
    parser = argparse.ArgumentParser(prog=PROGRAM, description=main.__doc__)
    parser.add_argument("-l", "--location", required=True)
    parser.add_argument("-p", "--ports", type=int, required=True)
    parser.add_argument("-a", "--action")
    args = parser.parse_args(argv)
    path = os.environ.get(ENV)
    if not path:
        print(f"{PROGRAM}: no virtual rig is open ({ENV} is not set): run it from the hil command that drives "
              "the rig", file=sys.stderr)
        return 1
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            request = {"hub": args.location, "port": args.ports, "action": args.action}
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(sock.makefile("r").readline())
    except (OSError, ValueError) as e:
        print(f"{PROGRAM}: the virtual rig's supply at {path} did not answer ({e})", file=sys.stderr)
        return 1
    print(reply["text"], end="", file=sys.stdout if reply["code"] == 0 else sys.stderr)
    return int(reply["code"])


def supply_for(rig: Rig, switch: Callable[[bool], None]) -> SupplyServer | None:
    """The supply server a rig's ``[power]`` needs; None for the relay (the module follows its mock pin).

    The virtual hub is the one the module's USB port hangs off (its bus's root hub for a root port), so a rig
    file naming another hub location gets uhubctl's own refusal. Commands may name any hub and port."""
    assert rig.virtual is not None
    if rig.power.backend == "relay":
        return None
    if rig.power.backend == "uhubctl":
        hub = rig.usb_port.hub
        return SupplyServer(rig.virtual.state_dir, str(hub) if hub else str(rig.usb_port.bus), rig.power.port, switch)
    return SupplyServer(rig.virtual.state_dir, None, None, switch)
