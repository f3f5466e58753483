"""Relay lines: 'on' means the asserted meaning whatever the wiring, and a bank always ends safe."""

from __future__ import annotations

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from hil.control.relays import RelayBank, pin_factory
from hil.errors import InfrastructureError
from hil.rig import RelayLine, Relays


@pytest.fixture(autouse=True)
def fresh_pins() -> None:
    """Pins as a new board has them: an earlier test's pulls (the virtual relay board models them) stay out."""
    factory = pin_factory("mock")
    assert isinstance(factory, MockFactory)
    factory.reset()


def relays(nwp_rest: bool = False) -> Relays:
    return Relays(
        power=RelayLine("power", 5, True, "mock"),
        nrpi_boot=RelayLine("nrpi_boot", 6, False, "mock"),
        eeprom_nwp=RelayLine("eeprom_nwp", 13, True, "mock"),
        off_time=0.0,
        nwp_protect_at_rest=nwp_rest,
    )


def level(gpio: int) -> bool:
    return bool(Device.pin_factory.pin(gpio).state)


def test_on_means_asserted_for_active_high_and_low() -> None:
    with RelayBank(relays()) as bank:
        assert bank.power and bank.nrpi_boot
        assert not level(5) and level(6)  # both off: active-low line idles high
        bank.power.set(True)
        bank.nrpi_boot.set(True)
        assert level(5) and not level(6)
        assert bank.power.is_on and bank.nrpi_boot.is_on


def test_bank_ends_safe_even_on_exception() -> None:
    with pytest.raises(RuntimeError), RelayBank(relays(nwp_rest=True)) as bank:
        assert bank.power and bank.nrpi_boot and bank.eeprom_nwp
        assert bank.eeprom_nwp.is_on  # resting level: protected
        bank.power.set(True)
        bank.nrpi_boot.set(True)
        bank.eeprom_nwp.set(False)
        raise RuntimeError("test crashed")
    assert not level(5) and level(6) and level(13)


def test_mock_factory_is_shared_with_gpiozero_default() -> None:
    assert isinstance(pin_factory("mock"), MockFactory)
    assert pin_factory("mock") is Device.pin_factory


def test_unusable_pin_factory_is_infrastructure_error() -> None:
    with pytest.raises(InfrastructureError, match="pin factory 'native' cannot drive GPIOs"):
        pin_factory("native")
