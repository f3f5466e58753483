"""A plain libusb rpiboot client, run as a child process: ``python plain_rpiboot.py PORT FOLDER``.

It is not the project's host: it makes the libusb calls rpiboot makes (through pyusb's libusb1 backend, which
wraps them one to one) and, like rpiboot's retry path, closes handles without releasing the interface, then
opens and claims again. Protocol as in usbboot-protocol.md sections 2-4: boot message and second stage to
the ROM, then the file server until Done. Prints one JSON line: what was sent and served.
"""

from __future__ import annotations

import json
import sys
import tarfile
import time
from array import array
from pathlib import Path
from typing import Any

import usb.core

VENDOR = 0x0A5C
CHIP = {0x2711: "2711", 0x2712: "2712"}  # else "2710"
BOOTCODE = {"2710": "bootcode.bin", "2711": "bootcode4.bin", "2712": "bootcode5.bin"}


def find(port: str, rom: bool, deadline: float) -> Any:
    bus, path = port.split("-", 1)
    numbers = tuple(int(p) for p in path.split("."))
    while time.monotonic() < deadline:
        for dev in usb.core.find(find_all=True, idVendor=VENDOR):
            if dev.bus == int(bus) and tuple(dev.port_numbers or ()) == numbers \
                    and (dev.iSerialNumber in (0, 3)) == rom:
                return dev
        time.sleep(0.05)
    raise SystemExit(f"no {'ROM' if rom else 'second stage'} on {port}")


def lookup(folder: Path, chip: str, name: str) -> bytes | None:
    """rpiboot's order: <dir>/<chip>/name, the bootfiles.bin member <chip>/name, <dir>/name."""
    if "/" in name or ".." in name:
        return None
    if (folder / chip / name).is_file():
        return (folder / chip / name).read_bytes()
    if (folder / "bootfiles.bin").is_file():
        with tarfile.open(folder / "bootfiles.bin") as tar:
            try:
                member = tar.extractfile(f"{chip}/{name}")
            except KeyError:
                member = None
            if member is not None:
                return member.read()
    plain = folder / name
    return plain.read_bytes() if plain.is_file() else None


class Handle:
    """libusb_open + libusb_claim_interface on the rpiboot interface; close() is libusb_close, no release."""

    def __init__(self, dev: Any):
        self.backend = dev._ctx.backend
        self.dev = dev
        self.interface = 0 if dev[0].bNumInterfaces == 1 else 1  # as rpiboot picks it
        self.out_ep = 0x01 if self.interface == 0 else 0x03
        self.handle = self.backend.open_device(dev._ctx.dev)
        self.backend.claim_interface(self.handle, self.interface)

    def write(self, data: bytes) -> None:
        size = len(data)
        self.backend.ctrl_transfer(self.handle, 0x40, 0, size & 0xFFFF, size >> 16, array("B"), 1000)
        for start in range(0, size, 16384):
            self.backend.bulk_write(self.handle, self.out_ep, self.interface, array("B", data[start:start + 16384]),
                                    5000)

    def read(self, length: int) -> bytes:
        buffer = array("B", bytes(length))
        n = self.backend.ctrl_transfer(self.handle, 0xC0, 0, length & 0xFFFF, length >> 16, buffer, 20000)
        return buffer[:n].tobytes()

    def close(self) -> None:
        self.backend.close_device(self.handle)


def main(port: str, folder: Path) -> None:
    deadline = time.monotonic() + 60
    rom = find(port, True, deadline)
    chip = CHIP.get(rom.idProduct, "2710")
    bootcode = lookup(folder, chip, BOOTCODE[chip])
    assert bootcode is not None, f"no {BOOTCODE[chip]} in {folder}"
    first = Handle(rom)
    first.close()  # a failed pass: closed without releasing, as rpiboot's retry does
    handle = Handle(rom)
    handle.write(len(bootcode).to_bytes(4, "little") + bytes(20))
    handle.write(bootcode)
    status = int.from_bytes(handle.read(4), "little")
    handle.close()
    served: list[list[Any]] = []
    stage2 = find(port, False, deadline)
    Handle(stage2).close()
    handle = Handle(stage2)
    while True:
        request = handle.read(260)
        command = int.from_bytes(request[:4], "little")
        name = request[4:].split(b"\0", 1)[0].decode("ascii", "replace")
        if command == 2 or not name and command == 0:
            break
        data = None if name.startswith("*") else lookup(folder, chip, name)
        if command == 0:
            handle.write(b"") if data is None else handle.backend.ctrl_transfer(
                handle.handle, 0x40, 0, len(data) & 0xFFFF, len(data) >> 16, array("B"), 1000)
        else:
            handle.write(data or b"")
            served.append([name, len(data or b"")])
    handle.close()
    print(json.dumps({"chip": chip, "status": status, "bootcode": len(bootcode), "served": served}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
