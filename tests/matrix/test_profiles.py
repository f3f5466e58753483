"""Host profiles and the quirk's signature, without a bus: what a lenient and a strict host make of each boot
stage's descriptors, and which failures count as the known CM1 incompatibility."""

from __future__ import annotations

import errno

import pytest

from hil.control.hostctl import quirk_signature
from hil.errors import InfrastructureError, InputError, ProductError
from hil.models import MODELS
from hil.virtual.usb.descriptors import rom_descriptors, stage2_descriptors
from hil.virtual.usb.hostprofiles import PROFILES, controller_spec
from hil.virtual.usb.switches import default_switches

KINDS = ("xhci", "ehci")


def rom(name: str, **switches: bool) -> tuple[str, tuple[bytes, ...]]:
    model = MODELS[name]
    sw = {**default_switches(model).__dict__, **switches}
    d = rom_descriptors(model, "12345678", config_55_32=sw["config_55_32"], full_speed=sw["full_speed"])
    return d.speed, (d.config,)


def test_lenient_host_clamps_the_cm1_rom_and_logs_what_linux_logs() -> None:
    admission = PROFILES["lenient"].admit(*rom("cm1"))
    assert admission.refusal is None
    assert admission.warnings == tuple(
        f"config 1 interface 0 altsetting 0 endpoint {ep} has invalid maxpacket 512, setting to 64"
        for ep in ("0x1", "0x2"))


def test_strict_host_refuses_the_cm1_rom_with_a_transaction_error() -> None:
    admission = PROFILES["strict"].admit(*rom("cm1"))
    assert admission.refusal == errno.EPROTO  # libusb reports it as IO (-1)
    assert "wMaxPacketSize 512" in admission.reason and admission.warnings == ()


@pytest.mark.parametrize("profile", ["lenient", "strict"])
@pytest.mark.parametrize("name", ["cm3", "cm4", "cm5"])
def test_later_roms_are_legal_on_every_host(profile: str, name: str) -> None:
    assert PROFILES[profile].admit(*rom(name)).refusal is None
    assert PROFILES[profile].admit(*rom(name)).warnings == ()


def test_the_cm1_rom_without_its_full_speed_quirk_passes_a_strict_host() -> None:
    assert PROFILES["strict"].admit(*rom("cm1", full_speed=False)).refusal is None


def test_second_stage_is_high_speed_and_legal() -> None:
    d = stage2_descriptors(MODELS["cm1"], "x", config_55_32=False)
    assert PROFILES["strict"].admit(d.speed, (d.config,)).refusal is None


def test_controller_names() -> None:
    assert controller_spec("xhci", KINDS) == ("xhci", PROFILES["lenient"])
    assert controller_spec("ehci-strict", KINDS) == ("ehci", PROFILES["strict"])
    for bad in ("ohci-strict", "xhci-picky", "", "xhci-"):
        with pytest.raises(InputError, match="ehci-strict"):
            controller_spec(bad, KINDS)


def rom_failure(first_result: str, stage: str = "usbboot.rom_transfer") -> InfrastructureError:
    transfers = [{"stage": "rom_transfer", "kind": "control_out", "note": "boot message", "result": first_result}]
    return InfrastructureError("announce(24) for boot message", stage=stage, trace={"transfers": transfers})


@pytest.mark.parametrize("result", ["io", "pipe"])
def test_quirk_signature_is_a_full_speed_cm1_rom_failing_its_first_transfer(result: str) -> None:
    found = quirk_signature(MODELS["cm1"], rom_failure(result), {"rom": "full"})
    assert found is not None and result in found and "full speed" in found


@pytest.mark.parametrize(("model", "error", "speeds"), [
    ("cm3", rom_failure("io"), {"rom": "full"}),  # fixed in the BCM2837
    ("cm1", rom_failure("io"), {"rom": "high"}),
    ("cm1", rom_failure("io"), {}),  # the speed was not seen: no evidence
    ("cm1", rom_failure("timeout"), {"rom": "full"}),
    ("cm1", rom_failure("io", stage="usbboot.rom"), {"rom": "full"}),
    ("cm1", ProductError("status 0x80000003", stage="usbboot.rom_transfer"), {"rom": "full"}),
    ("cm1", ValueError("not a framework error"), {"rom": "full"}),
])
def test_other_failures_are_not_the_quirk(model: str, error: Exception, speeds: dict[str, str]) -> None:
    assert quirk_signature(MODELS[model], error, speeds) is None


def test_a_later_transfer_failing_is_not_the_quirk() -> None:
    error = rom_failure("io")
    error.evidence["trace"]["transfers"].insert(0, {"stage": "rom_transfer", "kind": "control_out", "result": "ok"})
    assert quirk_signature(MODELS["cm1"], error, {"rom": "full"}) is None
