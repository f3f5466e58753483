"""Boot mode (nRPI_BOOT) and EEPROM write protection (EEPROM_nWP), in the only order that works.

The SoC samples nRPI_BOOT once, when it comes out of reset; a level changed while it runs does nothing
until the next power cycle, and a test that believes otherwise flashes the wrong thing or boots the old
image. So the lines change only while the supply is off, under the power switch's own lock, and
:meth:`BootMode.power_on` sets them, reads them back and applies power as one step that nothing else can
interleave with. Whether USB boot really happened is then proven on the rig's USB port: the boot ROM
must enumerate there (:func:`wait_for_rom`).
"""

from __future__ import annotations

import time
from typing import Any

import usb.backend.libusb1

from hil.control.power import PowerSwitch
from hil.control.relays import Relay
from hil.errors import InfrastructureError, InputError
from hil.rig import Rig
from hil.usbboot.events import PortEvents
from hil.usbboot.selection import (
    Identity,
    Stage,
    find_on_port,
    identity,
    model_for_rom,
    port_not_on_host,
)

STAGE = "bootmode"


class BootMode:
    def __init__(self, rig: Rig, power: PowerSwitch):
        self.rig = rig
        self.power = power
        relays = rig.relays
        self._nrpi_boot: Relay | None = None
        self._nwp: Relay | None = None
        try:
            if relays.nrpi_boot is not None:
                self._nrpi_boot = Relay(relays.nrpi_boot)
            if relays.eeprom_nwp is not None:
                self._nwp = Relay(relays.eeprom_nwp, initially_on=relays.nwp_protect_at_rest)
        except BaseException:
            self.close()
            raise

    @property
    def usb_boot(self) -> bool:
        """nRPI_BOOT asserted, read back from its line."""
        return self._nrpi_boot is not None and self._nrpi_boot.is_on

    @property
    def write_protected(self) -> bool | None:
        """EEPROM_nWP pulled low; None when the rig does not wire it."""
        return None if self._nwp is None else self._nwp.is_on

    def set(self, *, usb_boot: bool | None = None, write_protect: bool | None = None) -> None:
        """Change the lines; refused while the module is powered, where it would silently do nothing."""
        with self.power.lock:
            if self.power.is_on:
                raise InfrastructureError(
                    "boot mode and EEPROM write protection can only change while the module is powered off "
                    "(the SoC samples them at reset). Fix: power off first, or use BootMode.power_on()",
                    stage=STAGE)
            if usb_boot is not None:
                if self._nrpi_boot is None:
                    if usb_boot:
                        raise InputError(f"{self.rig.path}: rig {self.rig.name} has no nRPI_BOOT relay, so it "
                                         "cannot USB-boot the module. Fix: add [relays.nrpi_boot]", stage=STAGE)
                else:
                    self._nrpi_boot.set(usb_boot)
            if write_protect is not None:
                if self._nwp is None:
                    if write_protect:
                        raise InputError(f"{self.rig.path}: rig {self.rig.name} has no EEPROM_nWP relay. "
                                         "Fix: add [relays.eeprom_nwp]", stage=STAGE)
                else:
                    self._nwp.set(write_protect)

    def power_on(self, *, usb_boot: bool, write_protect: bool | None = None) -> None:
        """Set the boot mode, then apply power, as one step; already on in that mode is fine."""
        with self.power.lock:
            if self.power.is_on:
                if self.usb_boot == usb_boot and (write_protect is None or self.write_protected == write_protect):
                    return
                raise InfrastructureError(
                    f"the module is already powered in {'USB' if self.usb_boot else 'eMMC'} boot mode. Fix: "
                    "power off before asking for another boot mode", stage=STAGE)
            self.set(usb_boot=usb_boot, write_protect=write_protect)
            self.power.on()
            if self.usb_boot != usb_boot:
                self.power.off()
                raise InfrastructureError(f"nRPI_BOOT changed while powering on (reads "
                                          f"{'asserted' if self.usb_boot else 'released'}); powered off again. "
                                          "Fix: check that nothing else drives its GPIO", stage=STAGE)

    def rest(self) -> None:
        """Release nRPI_BOOT and put EEPROM_nWP back to its resting level (the module must be off)."""
        self.set(usb_boot=False, write_protect=self.rig.relays.nwp_protect_at_rest if self._nwp else None)

    def safe(self) -> None:
        """Power off first, then the lines to rest: the state a rig is left in."""
        with self.power.lock:
            self.power.off()
            self.rest()

    def close(self) -> None:
        for relay in (self._nrpi_boot, self._nwp):
            if relay is not None:
                relay.close()


def _backend(backend: Any) -> Any:
    found = backend or usb.backend.libusb1.get_backend()
    if found is None:
        raise InfrastructureError("libusb-1.0 is not available. Fix: install libusb-1.0-0", stage="usbboot.rom")
    return found


def find_rom(rig: Rig, backend: Any = None) -> Identity | None:
    """The boot ROM on the rig's USB port right now, if there is one (devices are not opened)."""
    port = rig.usb_port
    for dev in find_on_port(port, _backend(backend)):
        found = identity(dev)
        if found.stage is Stage.ROM:
            if found.pid != rig.model.rom_pid:
                chip = model_for_rom(found.pid).chip
                raise InputError(f"port {port} has a {chip} boot ROM ({found}) but rig {rig.name} says "
                                 f"{rig.model.name}. Fix: correct model or [usb] port in {rig.path}",
                                 stage="usbboot.rom")
            return found
    return None


def wait_for_rom(rig: Rig, timeout: float, backend: Any = None) -> Identity:
    """Prove USB boot: the rig's model's boot ROM enumerates on the rig's port within ``timeout``."""
    port = rig.usb_port
    backend = _backend(backend)
    with PortEvents(port) as events:
        found = events.wait(lambda: find_rom(rig, backend), time.monotonic() + timeout)
    if found is None:
        others = [str(identity(d)) for d in find_on_port(port, backend)]
        missing = None if others else port_not_on_host(port)
        if missing is not None:
            raise InfrastructureError(f"no {rig.model.name} boot ROM appeared on USB port {port} within {timeout:g} s: "
                                      f"{missing}. Fix: correct [usb] port in {rig.path} (lsusb -t shows this "
                                      "host's ports), or plug the hub back in", stage="usbboot.rom", port=str(port),
                                      missing_port=True)
        saw = f"; the port has {', '.join(others)}" if others else "; the port stayed empty"
        raise InfrastructureError(
            f"no {rig.model.name} boot ROM (0a5c:{rig.model.rom_pid:04x}) appeared on USB port {port} within "
            f"{timeout:g} s of power-on with nRPI_BOOT asserted{saw}. Fix: check the nRPI_BOOT relay or jumper "
            "and the USB cable from the module's USB slave port", stage="usbboot.rom", port=str(port))
    return found
