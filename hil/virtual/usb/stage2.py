"""The second stage (bootcode.bin / bootcode4.bin / bootcode5.bin) as a file-server client.

The device asks for files with 260-byte requests (int32 command: 0 GetFileSize, 1 ReadFile, 2 Done, then
a NUL-terminated 256-byte name) that the host fetches with a control IN of wLength 260. The host answers
GetFileSize with an announce carrying the size and no data, ReadFile with an announce plus that many
bulk bytes, and a missing file or a ``*KEY*VALUE`` metadata request with announce(0)
(usbboot-protocol.md section 4).

Each program runs as plain sequential code on the orchestrator's thread and blocks in :meth:`_ask` until
the host has read the request and answered it, so what it asks next can depend on what it got, and
device-side work (DDR init, flashing, booting Linux) takes its scaled time whether or not the host is
polling. A request exists only once the device is ready: a control IN before that is simply not
completed until the host gives up (its timeout), as on hardware.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hil.virtual.eeprom import VirtualEeprom
from hil.virtual.usb import genuine
from hil.virtual.usb.descriptors import stage2_descriptors
from hil.virtual.usb.device import Cancelled, ControlSetup, Stall, Unresponsive
from hil.virtual.usb.payloads import MEMSYS_COUNT, StandIn, read_stand_in
from hil.virtual.usb.switches import DeviceEnv, VendorControl

GET_FILE_SIZE, READ_FILE, DONE = 0, 1, 2
REQUEST_SIZE = 260
_COMMAND_NAMES = {GET_FILE_SIZE: "GetFileSize", READ_FILE: "ReadFile", DONE: "Done"}

#: Device-side work on hardware, in seconds (usbboot-protocol.md section 8).
FIRST_REQUEST = 0.05  # second stage up to its first request
DDR_INIT = 0.4  # mcb.bin + memsys*.bin applied, then bootmain requested
BOOTMAIN_START = 0.3
RAMDISK_BOOT = 0.2  # boot.img checked and handed to the kernel before Done
MSD_FIRMWARE_START = 0.2  # start.elf (msd) takes over before Done
EEPROM_FLASH = {"2711": 1.6, "2712": 14.0}  # read, erase, write and verify of 512 KiB / 2 MiB


@dataclass(frozen=True)
class Outcome:
    """What follows Done: ``next`` is "msd", "gadget", "recovery", "rebooted" or "halted"."""

    next: str
    leaves_bus: bool


class _PowerCut(Exception):
    pass


class SecondStage:
    """One enumeration of a second stage running ``program`` (msd, gadget or recovery), a stand-in or a genuine
    one recognised by structure; recovery writes ``eeprom``, the module's SPI EEPROM (None: the module has none)."""

    def __init__(self, env: DeviceEnv, program: StandIn, eeprom: VirtualEeprom | None = None):
        self.env = env
        self.program = program
        self.eeprom = eeprom
        self.descriptors = stage2_descriptors(env.model, env.serial, config_55_32=env.switches.config_55_32)
        self.identity = self.descriptors.identity()
        self._ep0 = VendorControl(self.descriptors, env, "second-stage")
        self._cond = threading.Condition()
        self._delay_pending = env.switches.request_delay > 0
        self._pending: bytes | None = None  # the next request, not yet read by the host
        self._pending_kind = ""
        self._awaiting = ""  # "size", "data" or "ack": the answer the device waits for
        self._remaining = 0
        self._buf = bytearray()
        self._answer: int | bytes | None = None

    # --- transport side -------------------------------------------------------------------------

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        self.env.check_power()
        reply = self._ep0.screen(setup, data)
        if reply is not None:
            return reply
        if setup.is_in:
            return self._hand_out_request(setup, cancel)
        with self._cond:
            self._announce(setup.wValue | setup.wIndex << 16)
        return b""

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        self.env.check_power()
        if endpoint not in self.descriptors.bulk_out:
            raise Stall(f"no bulk OUT endpoint {endpoint:#x}")
        with self._cond:
            if not self._remaining:
                self._fault("bulk without announce", bytes=len(data))
                raise Unresponsive("no transfer announced")
            if len(data) > self._remaining:
                self._fault("bulk longer than announced", bytes=len(data), announced_left=self._remaining)
                raise Stall("more data than announced")
            if not self.env.take_bulk(len(data)):
                self._fault("truncated_bulk", received=self.env.bulk_received)
                raise Unresponsive("device stopped accepting bulk data")
            self._buf += data
            self._remaining -= len(data)
            if not self._remaining:
                self._answered(bytes(self._buf))
            return len(data)

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        raise Unresponsive("the second stage never sends bulk data")

    def out_pending(self, endpoint: int) -> int:
        """Bytes the second stage has armed its OUT endpoint for (see :meth:`BootRom.out_pending`)."""
        with self._cond:
            return self._remaining if endpoint in self.descriptors.bulk_out else 0

    def _hand_out_request(self, setup: ControlSetup, cancel: threading.Event) -> bytes:
        if setup.wLength != REQUEST_SIZE:
            self._fault("request read length", wLength=setup.wLength)
            raise Stall("a file request is 260 bytes")
        with self._cond:
            while self._pending is None:
                if cancel.is_set():
                    raise Cancelled("host gave up waiting for a request")
                self.env.check_power()
                self._cond.wait(0.02)
            request, self._pending = self._pending, None
            self._awaiting = self._pending_kind
            self._cond.notify_all()
            return request

    def _announce(self, n: int) -> None:
        if self._remaining:
            self._fault("announce before data complete", left=self._remaining, announced=n)
            self._remaining, self._buf = 0, bytearray()
        if self._awaiting == "data" and n:
            self._remaining, self._buf = n, bytearray()
        elif self._awaiting == "data":
            self._answered(b"")
        elif self._awaiting in ("size", "ack"):
            self._answered(n)
        else:
            self._fault("announce without a request", announced=n)
            raise Stall("no request outstanding")

    def _answered(self, answer: int | bytes) -> None:
        self._answer, self._awaiting, self._remaining = answer, "", 0
        self._buf = bytearray()
        self._cond.notify_all()

    def _fault(self, what: str, **details: object) -> None:
        self.env.journal.record("fault", what, stage="second-stage", **details)

    # --- device side ------------------------------------------------------------------------------

    def run(self) -> Outcome | None:
        """Run the program until Done; None when power was cut first."""
        programs: dict[str, Callable[[], Outcome]] = {"msd": self._msd, "gadget": self._gadget,
                                                      "recovery": self._recovery}
        try:
            return programs[self.program.program]()
        except _PowerCut:
            return None

    def _work(self, seconds: float) -> None:
        if not self.env.clock.sleep(seconds, self.env.power_cut):
            raise _PowerCut

    def _ask(self, command: int, name: str, kind: str) -> int | bytes | None:
        if self._delay_pending:
            self._delay_pending = False
            delay = self.env.switches.request_delay
            self.env.journal.record("fault", "request_delay", stage="second-stage", seconds=delay)
            self._work(delay)
        request = struct.pack("<i256s", command, name.encode("ascii")[:255])
        with self._cond:
            self._pending, self._pending_kind, self._answer = request, kind, None
            self._cond.notify_all()
            while self._pending is not None or self._awaiting:
                if self.env.power_cut.is_set():
                    raise _PowerCut
                self._cond.wait(0.02)
            return self._answer

    def _fetch(self, name: str) -> bytes | None:
        """GetFileSize, then ReadFile if the host has the file: the content, or None when missing/empty."""
        size = self._ask(GET_FILE_SIZE, name, "size")
        self.env.journal.record("file", name, command=_COMMAND_NAMES[GET_FILE_SIZE], size=size)
        if not size:
            return None
        data = self._ask(READ_FILE, name, "data")
        assert isinstance(data, bytes)
        self.env.journal.record("file", name, command=_COMMAND_NAMES[READ_FILE], size=len(data))
        self.env.journal.record("bulk", name, bytes=len(data))
        if len(data) != size:
            self._fault("file size changed between GetFileSize and ReadFile", file=name, size=size,
                        read=len(data))
        return data or None

    def _metadata(self, key: str, value: str) -> None:
        self._ask(GET_FILE_SIZE, f"*{key}*{value}", "ack")
        self.env.journal.record("metadata", key, value=value)

    def _done(self) -> None:
        self._ask(DONE, "done", "")
        self.env.journal.record("stage", "done", program=self.program.program)

    def _halt(self, why: str, **details: object) -> Outcome:
        self._fault(why, **details)
        return Outcome("halted", leaves_bus=False)

    # --- programs (usbboot-protocol.md section 4.4) -----------------------------------------------

    def _msd(self) -> Outcome:
        """Legacy msd bootcode: load the msd firmware (start.elf / start4.elf), which becomes 0a5c:0001."""
        self._work(FIRST_REQUEST)
        chip = self.program.chip
        probes = ("autoboot.txt", "config.txt", "recovery.elf") if chip == "2710" else \
            ("config.txt", "pieeprom.sig", "recover4.elf")
        for name in probes:
            self._fetch(name)
        start_name = "start.elf" if chip == "2710" else "start4.elf"
        start = self._fetch(start_name)
        self_contained = self.program.genuine and chip != "2710"  # msd/bootcode4.bin is the MSD device itself
        if start is None and not self_contained:
            self._done()
            return self._halt("no firmware", file=start_name)
        self._fetch("fixup.dat" if chip == "2710" else "fixup4.dat")
        firmware = read_stand_in(start or b"")
        stand_in = firmware is not None and firmware.program == "msd-firmware" and firmware.chip == chip
        if not (stand_in or self_contained or chip == "2710" and genuine.msd_firmware(start or b"")):
            self._done()
            return self._halt("not the msd firmware", file=start_name,
                              reason="neither stand-in msd firmware nor shaped like usbboot's msd/start.elf")
        self._work(MSD_FIRMWARE_START)
        self._done()
        return Outcome("msd", leaves_bus=True)

    def _gadget(self) -> Outcome:
        """bootcode4/5 of mass-storage-gadget64: DDR init, bootmain, then the Linux ramdisk boot.img."""
        self._work(FIRST_REQUEST)
        ddr = ["mcb.bin", *(f"memsys{i:02d}.bin" for i in range(MEMSYS_COUNT[self.program.chip]))]
        missing = [name for name in ddr if self._fetch(name) is None]
        if missing:
            return self._halt("DDR init failed", missing=missing)
        self._work(DDR_INIT)
        bootmain = self._fetch("bootmain")
        if bootmain is None:
            return self._halt("no bootmain")
        made = read_stand_in(bootmain)
        if not (made and made.program == "bootmain" and made.chip == self.program.chip
                or genuine.videocore_elf(bootmain)):
            return self._halt("bootmain is not a program for this chip",
                              reason="neither a stand-in bootmain nor a VideoCore ELF")
        self._work(BOOTMAIN_START)
        config = (self._fetch("config.txt") or b"").decode("ascii", "replace")
        if _settings(config).get("boot_ramdisk") != "1":
            self._done()
            return self._halt("config.txt lacks boot_ramdisk=1")
        ramdisk = self._fetch("boot.img")
        if ramdisk is None:
            self._done()
            return self._halt("no boot.img")
        made = read_stand_in(ramdisk[:64])
        if not (made and made.name == "boot.img" or genuine.fat_image(ramdisk)):
            self._done()
            return self._halt("boot.img is not a FAT image", reason="the bootloader cannot load it as a ramdisk")
        self._work(RAMDISK_BOOT)
        self._done()
        return Outcome("gadget", leaves_bus=True)

    def _recovery(self) -> Outcome:
        """recovery.bin: verify pieeprom against pieeprom.sig, write the EEPROM (unless it is write-protected;
        a power cut tears the write), apply ``eeprom_write_protect``, report metadata, then Done."""
        self._work(FIRST_REQUEST)
        chip = self.program.chip
        settings = _settings((self._fetch("config.txt") or b"").decode("ascii", "replace"))
        sig = self._fetch("pieeprom.sig")
        image = self._fetch("pieeprom.upd") or self._fetch("pieeprom.bin")
        update = ""
        if image is not None:
            digest = hashlib.sha256(image).hexdigest()
            expected = sig.decode("ascii", "replace").split()[0].lower() if sig and sig.split() else ""
            if digest != expected:
                update = "failed"
                self._fault("pieeprom.sig does not match", sha256=digest, sig=expected or None)
            elif self.eeprom is None:
                update = "failed"
                self._fault("no EEPROM on this module")
            else:
                result = self.eeprom.update(image, EEPROM_FLASH[chip], self._work)
                update = "success" if result == "success" else "failed"
                if update == "success":
                    self.env.journal.record("stage", "eeprom-flashed", bytes=len(image), sha256=digest)
        if self.eeprom is not None and update != "failed":
            self.eeprom.set_protect_bits(settings.get("eeprom_write_protect"))
        if update != "success" and chip == "2711":
            for name in ("recover4.elf", "start4.elf"):
                self._fetch(name)
        if settings.get("recovery_metadata") != "0":
            self._metadata("USER_SERIAL_NUM", self.env.serial)
            self._metadata("MAC_ADDR", _mac(self.env.serial))
            if update:
                self._metadata("EEPROM_UPDATE", update)
            contents = self.eeprom.contents() if self.eeprom is not None else b""
            self._metadata("EEPROM_HASH", hashlib.sha256(contents).hexdigest())
            self._metadata("SECURE_BOOT_PROVISION", "0")
            self._metadata("JTAG_LOCKED", "0")
        self._done()
        if settings.get("recovery_reboot") == "1":
            return Outcome("rebooted", leaves_bus=True)
        return Outcome("recovery", leaves_bus=False)


def _settings(config: str) -> dict[str, str]:
    """``key=value`` lines of a config.txt, comments and sections ignored (last one wins)."""
    out = {}
    for line in config.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line and not line.startswith("["):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _mac(serial: str) -> str:
    """A Raspberry Pi (d8:3a:dd) MAC derived from the SoC serial, stable per module."""
    tail = serial[-6:].rjust(6, "0")
    return ":".join(["d8", "3a", "dd", tail[0:2], tail[2:4], tail[4:6]])

