"""Each way a boot goes wrong ends in one classified error (whose fault, which stage) within the
configured timeout, and leaves the module powered off."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from hil.control.lifecycle import ModuleState
from hil.errors import HilError, InfrastructureError, ProductError

#: Generous slack over a stage timeout: host scheduling on a busy 2-core machine, never a speed check.
SLACK = 2.0


def failed_boot(b: Any, expected: type[HilError], *, build_id: str | None = "good",
                cmdline: tuple[str, ...] = (), expect: str | None = None) -> HilError:
    """Write the image (none for a blank eMMC), boot, and return the error after checking it is safe."""
    with b.lifecycle() as lc:
        if build_id is not None:
            lc.flash(b.writer(build_id, cmdline), build_id=build_id)
        started = time.monotonic()
        with pytest.raises(HilError) as info:
            lc.boot(expect_build_id=expect)
        elapsed = time.monotonic() - started
        assert lc.state is ModuleState.OFF and not lc.power.is_on and not lc.bootmode.usb_boot
    err = info.value
    assert type(err) is expected, f"{type(err).__name__}: {err}"
    assert err.stage.startswith("boot."), err.stage
    assert elapsed < b.rig.timeouts["login"] + SLACK
    return err


def test_blank_emmc_cm4_is_product_fault_at_kernel_stage(bench: Callable[..., Any]) -> None:
    err = failed_boot(bench("cm4", timeouts={"kernel": 1}), ProductError, build_id=None)
    assert err.stage == "boot.kernel" and "no boot filesystem on the eMMC" in str(err)


def test_blank_emmc_cm3_falls_back_to_usb_boot(bench: Callable[..., Any]) -> None:
    err = failed_boot(bench("cm3", timeouts={"kernel": 1}), ProductError, build_id=None)
    assert err.stage == "boot.kernel"
    if "libumockdev-preload" in os.environ.get("LD_PRELOAD", ""):
        assert "boot ROM appeared on USB port 1-1.3" in str(err)


def test_stale_image_is_product_fault_naming_both_builds(bench: Callable[..., Any]) -> None:
    err = failed_boot(bench("cm5"), ProductError, build_id="previous", expect="just-written")
    assert err.stage == "boot.build-id"
    assert "'previous'" in str(err) and "'just-written'" in str(err)


def test_kernel_panic_is_product_fault(bench: Callable[..., Any]) -> None:
    err = failed_boot(bench("cm4"), ProductError, cmdline=("root=/dev/mmcblk0p5", "rootwait=1"))
    assert "Kernel panic - not syncing" in str(err)


def test_build_id_marker_catches_stale_image_before_login(bench: Callable[..., Any]) -> None:
    b = bench("cm1", extra="[boot.markers]\nbuild_id = 'hil test image (\\S+)'\n")
    err = failed_boot(b, ProductError, build_id="previous", expect="just-written")
    assert err.stage == "boot.build-id" and "printed during boot" in str(err)


def test_serial_unplug_is_infrastructure(bench: Callable[..., Any]) -> None:
    b = bench("cm4", extra="[virtual.console]\nunplug_after = 0.3\n")
    with b.lifecycle() as lc:
        lc.console  # noqa: B018 (open it now, as a test does before anything is powered)
        lc.flash(b.writer("good"), build_id="good")
        with pytest.raises(InfrastructureError) as info:
            lc.boot()
        assert lc.state is ModuleState.OFF and not lc.power.is_on
    assert info.value.stage.startswith("boot.") and "went away" in str(info.value)


def test_serial_garbage_is_infrastructure_naming_baud_rate(bench: Callable[..., Any]) -> None:
    b = bench("cm4", extra="[virtual.console]\ngarbage = true\n", timeouts={"bootloader": 0.5})
    err = failed_boot(b, InfrastructureError)
    assert err.stage == "boot.bootloader" and "baud rate" in str(err)


def test_silent_console_on_a_talking_bootloader_is_infrastructure(bench: Callable[..., Any]) -> None:
    b = bench("cm5", timeouts={"bootloader": 0.3})
    b.vrig.console.write = lambda *args, **kwargs: None  # TX wire cut: the module talks, nobody hears
    err = failed_boot(b, InfrastructureError)
    assert err.stage == "boot.bootloader" and "nothing at all arrived" in str(err)
