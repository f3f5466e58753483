"""The CM4/CM5 bootloader EEPROM: update it through USB boot and prove it, walk BOOT_ORDER variants, protect it,
and recover a module whose update was cut short.

Every update is judged from recovery.bin's metadata against pieeprom.sig, then confirmed on the UART after a
power cycle (hil/eeprom/flash.py). The recovery folder is ``--payload`` for the rig's model when it is one
(usbboot's recovery/ or recovery5/), else, on a virtual rig, a generated stand-in. Each test leaves the module
with an eMMC-first BOOT_ORDER and write protection cleared.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import allure
import pytest

from hil.control.lifecycle import Lifecycle
from hil.eeprom.build import build_update
from hil.eeprom.flash import EepromUpdate, flash_eeprom, read_banner
from hil.errors import InfrastructureError, InputError, ProductError
from hil.rig import Rig
from hil.usbboot.fileserver import Payload
from hil.usbboot.trace import FileServed, Listener

pytestmark = pytest.mark.needs("eeprom", "nrpi_boot")

#: BOOT_ORDER per variant and model: the CM5 has no BCM-USB-MSD (0x5), its USB boot mode is USB-MSD (0x4).
ORDERS = {"network-first": {"cm4": "0xf2", "cm5": "0xf2"},
          "usb-then-emmc": {"cm4": "0xf15", "cm5": "0xf14"},
          "emmc": {"cm4": "0xf1", "cm5": "0xf1"}}
SAFE_ORDER = "0xf41"  # eMMC first: what other suites expect to find
#: The modes each variant's bootloader must walk first, as the UART names them.
WALKS = {"network-first": ["NETWORK", "RESTART", "NETWORK", "RESTART", "NETWORK"],
         "usb-then-emmc": {"cm4": ["BCM-USB-MSD", "SD"], "cm5": ["USB-MSD", "SD"]},
         "emmc": ["SD"]}


@pytest.fixture
def recovery(rig: Rig, payload: Path | None, tmp_path: Path) -> Callable[..., Path]:
    """recovery(boot_order=None, config_txt=()) -> a recovery folder whose pieeprom.bin carries that BOOT_ORDER
    (BOOT_UART=1) and whose config.txt has the extra lines."""
    if payload is not None and Payload(payload, rig.model).is_recovery:
        base = payload
    elif rig.is_virtual:
        from hil.virtual.usb.payloads import make_payload

        base = make_payload(tmp_path / "stand-in", "recovery" if rig.model.chip_dir == "2711" else "recovery5",
                            (rig.model.name,))
    else:
        pytest.skip(f"rig {rig.name} needs a recovery folder: --payload {rig.model.name}=path/to/usbboot/"
                    f"{'recovery' if rig.model.name == 'cm4' else 'recovery5'}")
    made = 0

    def make(boot_order: str = SAFE_ORDER, config_txt: tuple[str, ...] = ()) -> Path:
        nonlocal made
        made += 1
        folder = tmp_path / f"recovery-{made}"
        shutil.copytree(base, folder)
        source = folder / "pieeprom.original.bin"
        if not source.exists():
            source = folder / "pieeprom.bin"
        build_update(folder, source.read_bytes(), f"[all]\nBOOT_UART=1\nBOOT_ORDER={boot_order}\n", rig.model,
                     source_name=source)
        config = folder / "config.txt"
        lines = [line for line in (config.read_text() if config.exists() else "").splitlines()
                 if not line.startswith(("eeprom_write_protect", "recovery_metadata"))]
        config.write_text("\n".join([*lines, *config_txt]) + "\n")
        return folder

    return make


def _attach(result: EepromUpdate) -> None:
    allure.attach(str(result.to_dict()), name="EEPROM update", attachment_type=allure.attachment_type.TEXT)


def boot_modes(lc: Lifecycle, count: int) -> list[str]:
    """Power on into the eMMC and read the first ``count`` boot modes the bootloader walks."""
    console = lc.console
    lc.off()
    lc.power.wait_discharged()
    console.skip_pending()
    lc.power_on()
    try:
        console.expect(r"RPi: BOOTLOADER release", lc.rig.timeouts["bootloader"], stage="eeprom.boot-order",
                       what="bootloader banner")
        return [console.expect(r"Boot mode: (\S+) \(", lc.rig.timeouts["bootloader"], stage="eeprom.boot-order",
                               what=f"boot mode {n + 1}").group(1) for n in range(count)]
    finally:
        lc.off()


def test_update_is_proven_by_metadata_and_the_uart(lifecycle: Lifecycle, recovery: Callable[..., Path]) -> None:
    folder = recovery(SAFE_ORDER)
    result = flash_eeprom(lifecycle, folder)
    _attach(result)
    assert result.metadata["EEPROM_UPDATE"] == "success"
    assert result.metadata["EEPROM_HASH"] == result.sha256
    assert result.banner is not None and f"0x{result.banner.boot_order:x}" == SAFE_ORDER
    assert result.banner.build_timestamp > 0


@pytest.mark.parametrize("variant", list(ORDERS))
def test_boot_order_decides_where_the_module_boots(lifecycle: Lifecycle, recovery: Callable[..., Path], rig: Rig,
                                                   variant: str) -> None:
    order = ORDERS[variant][rig.model.name]
    walk = WALKS[variant]
    expected = walk[rig.model.name] if isinstance(walk, dict) else walk
    try:
        result = flash_eeprom(lifecycle, recovery(order))
        _attach(result)
        assert result.banner is not None and f"0x{result.banner.boot_order:x}" == order
        assert boot_modes(lifecycle, len(expected)) == expected
    finally:
        if variant != "emmc":
            flash_eeprom(lifecycle, recovery(SAFE_ORDER), confirm=False)


@pytest.mark.needs("eeprom_nwp")
def test_write_protection_holds_only_while_nwp_is_low(lifecycle: Lifecycle, recovery: Callable[..., Path],
                                                      rig: Rig) -> None:
    try:
        protected = flash_eeprom(lifecycle, recovery(config_txt=("eeprom_write_protect=1",)))
        _attach(protected)
        assert protected.protection == "verified: a write with EEPROM_nWP low was refused"
        if not rig.relays.nwp_protect_at_rest:
            assert any("nwp_protect_at_rest" in note for note in protected.notes)
        with pytest.raises(InfrastructureError) as refused:
            flash_eeprom(lifecycle, recovery("0xf21"), keep_write_protect=True)
        assert refused.value.stage == "eeprom.update" and "write-protected" in refused.value.message
    finally:
        cleared = flash_eeprom(lifecycle, recovery(config_txt=("eeprom_write_protect=0",)))
    _attach(cleared)
    assert cleared.protection == "verified: a write with EEPROM_nWP low was accepted"


class _PowerCut(Listener):
    """Cuts the module's power once it has pieeprom.bin and is writing its EEPROM.

    A virtual module is slowed to near hardware pace meanwhile: at a high speed-up a CM4's whole update takes
    less time than a loaded host may need to react, and the cut must land inside it."""

    def __init__(self, lc: Lifecycle, rig: Rig):
        self.lc, self.rig = lc, rig
        self.fired = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[_PowerCut]:
        if not self.rig.is_virtual:
            yield self
            return
        from hil.virtual.rig import VirtualRig

        clock = VirtualRig.running(self.rig.name).clock
        fast, clock.speedup = clock.speedup, min(clock.speedup, 2.0)
        try:
            yield self
        finally:
            clock.speedup = fast

    def file_served(self, served: FileServed) -> None:
        if served.name not in ("pieeprom.bin", "pieeprom.upd") or not served.size or self.fired:
            return
        if self.rig.is_virtual:
            from hil.virtual.rig import VirtualRig

            eeprom = VirtualRig.running(self.rig.name).eeprom
            assert eeprom is not None and eeprom.writing.wait(5.0), "the virtual module never started writing"
        else:
            time.sleep(0.3)  # well inside the ~1 s (CM4) to ~14 s (CM5) a real update takes
        self.fired = True
        self.lc.power.off()


def test_interrupted_update_is_recovered_through_usb_boot(lifecycle: Lifecycle, recovery: Callable[..., Path],
                                                          rig: Rig) -> None:
    folder = recovery(SAFE_ORDER)
    with _PowerCut(lifecycle, rig).armed() as cut, pytest.raises(InfrastructureError) as interrupted:
        flash_eeprom(lifecycle, folder, listener=cut)
    assert cut.fired and interrupted.value.stage == "eeprom.update"
    assert "half-written" in interrupted.value.message
    with pytest.raises(ProductError) as silent:
        read_banner(lifecycle)
    assert "no valid bootloader" in silent.value.message
    recovered = flash_eeprom(lifecycle, folder)
    _attach(recovered)
    assert recovered.banner is not None and f"0x{recovered.banner.boot_order:x}" == SAFE_ORDER


def test_bad_payloads_are_refused_before_the_module_is_touched(lifecycle: Lifecycle, rig: Rig,
                                                               recovery: Callable[..., Path]) -> None:
    stale = recovery()
    (stale / "pieeprom.sig").write_text("0" * 64 + "\nts: 1\n")
    unsigned = recovery()
    (unsigned / "pieeprom.sig").unlink()
    lifecycle.off()
    switched_on = _power_ons(rig)
    for folder, says in ((stale, "does not match"), (unsigned, "is missing")):
        with pytest.raises(InputError) as refused:
            flash_eeprom(lifecycle, folder)
        assert says in refused.value.message and "Fix:" in refused.value.message
    assert not lifecycle.power.is_on and _power_ons(rig) == switched_on


def _power_ons(rig: Rig) -> int | None:
    """How often the virtual module was switched on (None on hardware, where only the relay's state shows)."""
    if not rig.is_virtual:
        return None
    from hil.virtual.rig import VirtualRig

    return sum(1 for e in VirtualRig.running(rig.name).journal.events("power") if e.what == "on")
