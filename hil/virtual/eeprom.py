"""The virtual CM4/CM5's SPI bootloader EEPROM: contents, write protection and what a torn write leaves.

The contents persist in the rig's state folder (``eeprom.bin``), like the eMMC, so a configuration written
in one run is what the module boots with in the next; a fresh rig starts from a generated stand-in image
(:func:`hil.eeprom.pieeprom.stand_in_image`) with the factory boot.conf. The status register's
write-protect bits (set by recovery.bin's ``eeprom_write_protect``) persist next to it in
``eeprom-status.json``.

As on a Winbond W25Q/W25X part, the protect bits only bite while /WP (EEPROM_nWP) is pulled low: then the
array and the status register are read-only. Writing is not atomic: recovery erases and programs block by
block, so a power cut mid-way leaves erased blocks behind and the boot ROM finds no valid bootloader. It
then stays silent on the UART and waits as a USB device, from where recovery can write the EEPROM again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hil.eeprom.bootconf import BootConf, parse_bootconf
from hil.eeprom.pieeprom import image_facts, read_config, stand_in_image, stand_in_intact
from hil.errors import InputError
from hil.models import ModuleModel
from hil.virtual.journal import Journal


@dataclass(frozen=True)
class Release:
    version: str  # git hash in the UART banner
    date: str  # as the banner prints it
    timestamp: int  # BUILD_TIMESTAMP


#: The bootloader a fresh virtual module ships with, and the newer one in the stand-in recovery payloads.
FACTORY = {"cm4": Release("8ba17717", "2024/04/15 TIME: 13:12:14", 1713186734),
           "cm5": Release("69471177", "2025/05/08 TIME: 15:13:17", 1746713597)}
LATEST = {"cm4": Release("d1a9d3ea", "2025/05/08 TIME: 15:16:42", 1746713802),
          "cm5": Release("4b3b5f3c", "2025/10/17 TIME: 12:21:05", 1760703665)}
#: boot.conf as shipped (factory) and as usbboot's recovery/ and recovery5/ folders carry it.
#: The factory config has BOOT_UART=0: a CM4/CM5 bootloader says nothing on the UART until it is configured.
FACTORY_CONFIG = {"cm4": "[all]\nBOOT_UART=0\nWAKE_ON_GPIO=1\nPOWER_OFF_ON_HALT=0\nBOOT_ORDER=0xf25641\n",
                  "cm5": "[all]\nBOOT_UART=0\nPOWER_OFF_ON_HALT=1\nBOOT_ORDER=0xf2461\n"}
RECOVERY_CONFIG = {"cm4": "[all]\nBOOT_UART=1\nWAKE_ON_GPIO=0\nPOWER_OFF_ON_HALT=0\nBOOT_ORDER=0xf25641\n"
                          "ENABLE_SELF_UPDATE=1\n",
                   "cm5": "[all]\nBOOT_UART=1\nPOWER_OFF_ON_HALT=1\nBOOT_ORDER=0xf2461\nENABLE_SELF_UPDATE=1\n"}

WRITE_STEPS = 16  # erase-and-program steps of one update (a power cut lands between or inside them)


def release_image(model: ModuleModel, release: Release, config: str) -> bytes:
    return stand_in_image(model, config, version=release.version, date=release.date, timestamp=release.timestamp)


@dataclass(frozen=True)
class Bootloader:
    """The bootloader the EEPROM holds, as it runs: its build and its boot.conf."""

    version: str
    date: str
    timestamp: int
    config: BootConf


class VirtualEeprom:
    """One module's EEPROM. ``path`` None keeps it in memory only (a module model used on its own)."""

    def __init__(self, model: ModuleModel, path: Path | None, journal: Journal,
                 write_protect_pin: Callable[[], bool] = lambda: False, *, boot_uart: bool = False):
        self.model = model
        self.path = path
        self.journal = journal
        self._pin = write_protect_pin  # EEPROM_nWP pulled low
        self._lock = threading.Lock()
        self.writing = threading.Event()  # set while an update erases and programs
        data = path.read_bytes() if path is not None and path.exists() else b""
        if not data:
            config = FACTORY_CONFIG[model.name]  # a rig that says BOOT_UART=1 has had its module configured so
            data = release_image(model, FACTORY[model.name],
                                 config.replace("BOOT_UART=0", "BOOT_UART=1") if boot_uart else config)
            self._save(data)
        self._data = bytearray(data)
        self._status_path = path.with_name("eeprom-status.json") if path is not None else None
        self._protect_bits = self._load_status()

    # -- what the module sees -----------------------------------------------------------------------

    def contents(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    @property
    def protect_bits(self) -> bool:
        """The status register's write-protect regions cover the EEPROM (``eeprom_write_protect=1``)."""
        return self._protect_bits

    @property
    def write_protected(self) -> bool:
        """Writes are refused now: protect bits set and /WP pulled low."""
        return self._protect_bits and self._pin()

    def bootloader(self) -> Bootloader | None:
        """What the boot ROM finds: None when the EEPROM holds no whole bootloader (torn write, erased)."""
        data = self.contents()
        if not stand_in_intact(data, self.model.chip_dir):
            return None
        facts = image_facts(data)
        if facts.version is None or facts.date is None or facts.build_timestamp is None:
            return None
        try:
            config = parse_bootconf(read_config(data, self.model), self.model.name, "bootconf.txt")
        except InputError:  # the bootloader ignores what it cannot read and runs with its defaults
            config = BootConf("", self.model.name)
        return Bootloader(facts.version, facts.date, facts.build_timestamp, config)

    # -- what recovery.bin does -------------------------------------------------------------------------

    def update(self, image: bytes, seconds: float, wait: Callable[[float], None]) -> str:
        """Erase and program ``image`` in :data:`WRITE_STEPS` blocks, then read it back, ``seconds`` (hardware)
        in all. ``wait(hardware_seconds)`` raises when power is cut: what was written so far stays, and a cut
        anywhere before the read-back leaves a block erased or half-programmed.

        Returns "success", "write-protected" or "verify-failed"."""
        if self.write_protected:
            self.journal.record("fault", "EEPROM write-protected", stage="eeprom", nwp_low=True, protect_bits=True)
            return "write-protected"
        if len(image) != len(self._data):
            self.journal.record("fault", "image does not fit the EEPROM", stage="eeprom", bytes=len(image))
            return "verify-failed"
        block = -(-len(image) // WRITE_STEPS)
        tick = seconds / (2 * WRITE_STEPS + 1)
        self.journal.record("eeprom", "update started", bytes=len(image))
        self.writing.set()
        written = 0
        try:
            for start in range(0, len(image), block):
                end = min(len(image), start + block)
                half = (start + end) // 2
                self._write(start, b"\xff" * (end - start))  # erase
                wait(tick)
                self._write(start, image[start:half])  # program, page by page
                wait(tick)
                self._write(half, image[half:end])
                written = end
            wait(tick)  # read back
        except BaseException:
            self.journal.record("eeprom", "update interrupted", written=written, bytes=len(image))
            raise
        finally:
            self.writing.clear()
        ok = self.contents() == image
        self.journal.record("eeprom", "update verified" if ok else "update verify failed", bytes=len(image))
        return "success" if ok else "verify-failed"

    def set_protect_bits(self, setting: str | None) -> bool:
        """``eeprom_write_protect``: "1" sets, "0" clears, absent or "-1" leaves them. False when the status
        register is locked (protect bits set and /WP low)."""
        if setting not in ("0", "1"):
            return True
        if self.write_protected:
            self.journal.record("fault", "status register locked", stage="eeprom", wanted=setting)
            return False
        self._protect_bits = setting == "1"
        if self._status_path is not None:
            self._status_path.write_text(json.dumps({"protect_bits": self._protect_bits}) + "\n")
        self.journal.record("eeprom", "status register", protect_bits=self._protect_bits)
        return True

    # -- storage ----------------------------------------------------------------------------------------

    def _write(self, offset: int, data: bytes) -> None:
        """Straight into the persisted file: no temporary copy, so a cut leaves exactly what was written."""
        with self._lock:
            self._data[offset:offset + len(data)] = data
            if self.path is not None:
                with open(self.path, "r+b") as f:
                    f.seek(offset)
                    f.write(data)

    def _save(self, data: bytes) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(data)

    def _load_status(self) -> bool:
        if self._status_path is None:
            return False
        try:
            return bool(json.loads(self._status_path.read_text()).get("protect_bits", False))
        except (OSError, ValueError, AttributeError):
            return False
