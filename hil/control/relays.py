"""Relay lines (power, nRPI_BOOT, EEPROM_nWP) driven through gpiozero.

"On" always means the line's asserted meaning (power applied, nRPI_BOOT pulled low, EEPROM_nWP pulled low);
the rig file's ``active_high`` maps that onto the GPIO level, so relay boards wired either way read the same
in tests. A bank always leaves its lines in the safe state (power off, nRPI_BOOT released, EEPROM_nWP at its
resting level) when it closes.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from types import TracebackType
from typing import Any

from hil.errors import InfrastructureError
from hil.rig import RelayLine, Relays

_factories: dict[str, Any] = {}


def pin_factory(name: str) -> Any:
    """The process-wide gpiozero pin factory called ``name`` (one per process, as gpiozero expects).

    ``mock`` reuses gpiozero's default factory when that is already a MockFactory, so that a virtual rig
    started in this process sees the pins the framework drives.
    """
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    if name == "mock":
        if not isinstance(Device.pin_factory, MockFactory):
            Device.pin_factory = MockFactory()
        return Device.pin_factory
    if name not in _factories:
        found = [e for e in entry_points(group="gpiozero_pin_factories") if e.name == name]
        if not found:
            raise InfrastructureError(f"gpiozero has no pin factory called {name!r}", stage="relays")
        try:
            _factories[name] = found[0].load()()
        except Exception as e:  # gpiozero raises many kinds: BadPinFactory, PinUnknownPi, ImportError, OSError
            raise InfrastructureError(
                f"gpiozero pin factory {name!r} cannot drive GPIOs on this machine ({type(e).__name__}: {e}); "
                "run on the rig's controller, or install the factory's library (e.g. pip install lgpio)",
                stage="relays") from e
    return _factories[name]


class Relay:
    def __init__(self, line: RelayLine, initially_on: bool = False):
        from gpiozero import OutputDevice

        self.line = line
        try:
            self._device = OutputDevice(line.gpio, active_high=line.active_high, initial_value=initially_on,
                                        pin_factory=pin_factory(line.pin_factory))
        except InfrastructureError:
            raise
        except Exception as e:
            raise InfrastructureError(f"cannot claim GPIO{line.gpio} for {line.role}: {e}", stage="relays") from e

    @property
    def is_on(self) -> bool:
        """Read back from the pin, not from what we last asked for."""
        return bool(self._device.value)

    def set(self, on: bool) -> None:
        self._device.value = on
        if self.is_on != on:
            raise InfrastructureError(
                f"relay {self.line.role} (GPIO{self.line.gpio}) reads back {'on' if self.is_on else 'off'} "
                f"after being switched {'on' if on else 'off'}", stage="relays", gpio=self.line.gpio)

    def close(self) -> None:
        self._device.close()


class RelayBank:
    """All relay lines of one rig; a context manager that always ends in the safe state."""

    def __init__(self, relays: Relays):
        self.config = relays
        self.power: Relay | None = None
        self.nrpi_boot: Relay | None = None
        self.eeprom_nwp: Relay | None = None
        try:
            if relays.power is not None:
                self.power = Relay(relays.power)
            if relays.nrpi_boot is not None:
                self.nrpi_boot = Relay(relays.nrpi_boot)
            if relays.eeprom_nwp is not None:
                self.eeprom_nwp = Relay(relays.eeprom_nwp, initially_on=relays.nwp_protect_at_rest)
        except BaseException:
            self.close()
            raise

    def safe(self) -> None:
        """Power off first, then release nRPI_BOOT and put EEPROM_nWP back to its resting level."""
        if self.power is not None:
            self.power.set(False)
        if self.nrpi_boot is not None:
            self.nrpi_boot.set(False)
        if self.eeprom_nwp is not None:
            self.eeprom_nwp.set(self.config.nwp_protect_at_rest)

    def close(self) -> None:
        try:
            self.safe()
        finally:
            for relay in (self.power, self.nrpi_boot, self.eeprom_nwp):
                if relay is not None:
                    relay.close()

    def __enter__(self) -> RelayBank:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
