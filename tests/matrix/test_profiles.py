"""Host profiles without a bus: the evidenced lenient host, and the labelled hypotheses for the BCM2835 "slightly
incorrect USB packet", each applying to a 2835 ROM only."""

from __future__ import annotations

import errno

import pytest

from hil.errors import InputError
from hil.models import MODELS
from hil.virtual.usb.descriptors import rom_descriptors, stage2_descriptors
from hil.virtual.usb.hostprofiles import HYPOTHESES, PROFILES, controller_spec
from hil.virtual.usb.switches import default_switches

KINDS = ("xhci", "ehci")


def rom(name: str, **switches: bool) -> tuple[str, tuple[bytes, ...], bytes]:
    model = MODELS[name]
    sw = {**default_switches(model).__dict__, **switches}
    d = rom_descriptors(model, "12345678", config_55_32=sw["config_55_32"], full_speed=sw["full_speed"])
    return d.speed, (d.config,), d.device


def test_the_2835_rom_at_full_speed_is_legal_on_the_lenient_host() -> None:
    """usbboot #69: a 0a5c:2763 at full speed, and no "invalid maxpacket" in the log."""
    admission = PROFILES["lenient"].admit(*rom("cm1"))
    assert admission.refusal is None and admission.warnings == ()


def test_a_later_rom_fallen_back_to_full_speed_is_clamped_with_linux_warning() -> None:
    """usbboot #226: "endpoint 0x1 has invalid maxpacket 512, setting to 64"; the device is used."""
    admission = PROFILES["lenient"].admit(*rom("cm4", full_speed=True))
    assert admission.refusal is None
    assert admission.warnings == tuple(
        f"config 1 interface 0 altsetting 0 endpoint {ep} has invalid maxpacket 512, setting to 64"
        for ep in ("0x1", "0x2"))


@pytest.mark.parametrize(("name", "refusal"), [("hypothesis-maxpacket", errno.EPROTO),
                                               ("hypothesis-status", errno.EPIPE),
                                               ("hypothesis-timeout", errno.ETIMEDOUT)])
def test_each_hypothesis_refuses_a_2835_rom_in_its_own_way_and_says_it_is_a_hypothesis(name: str,
                                                                                      refusal: int) -> None:
    admission = PROFILES[name].admit(*rom("cm1"))
    assert admission.refusal == refusal
    assert admission.reason.startswith(f"hypothesis {name.removeprefix('hypothesis-')}: ")
    assert "hypothesis" in PROFILES[name].label and "unconfirmed" in PROFILES[name].label
    assert set(HYPOTHESES) == {"hypothesis-maxpacket", "hypothesis-status", "hypothesis-timeout"}


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("name", ["cm3", "cm4", "cm5"])
def test_later_roms_are_never_refused(profile: str, name: str) -> None:
    assert PROFILES[profile].admit(*rom(name)).refusal is None
    assert PROFILES[profile].admit(*rom(name)).warnings == ()


@pytest.mark.parametrize("profile", list(PROFILES))
def test_second_stage_is_high_speed_and_never_refused(profile: str) -> None:
    d = stage2_descriptors(MODELS["cm1"], "x", config_55_32=False)
    assert PROFILES[profile].admit(d.speed, (d.config,), d.device).refusal is None


def test_controller_names() -> None:
    assert controller_spec("xhci", KINDS) == ("xhci", PROFILES["lenient"])
    assert controller_spec("ehci-hypothesis-maxpacket", KINDS) == ("ehci", PROFILES["hypothesis-maxpacket"])
    for bad in ("ohci-lenient", "xhci-picky", "", "xhci-", "ehci-strict"):
        with pytest.raises(InputError, match="ehci-hypothesis-maxpacket"):
            controller_spec(bad, KINDS)
