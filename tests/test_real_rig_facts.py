"""Real rigs and the virtual ones that stand for them: a real rig is never given the stand-in test image, and the
shipped virtual rigs have each model's real (smallest) eMMC size."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.errors import InputError
from hil.models import emmc_size_plausible
from hil.nightly import check_images_for_real_rigs
from hil.rig import load_rig

REPO = Path(__file__).resolve().parent.parent


def test_real_rig_without_image_is_refused_and_virtual_rig_keeps_its_stand_in() -> None:
    real = load_rig(REPO / "rigs" / "example-cm4-io-board.toml", check_devices=False)
    virtual = load_rig(REPO / "rigs" / "virtual-cm4.toml")
    with pytest.raises(InputError, match="real rig.*--image") as e:
        check_images_for_real_rigs([virtual, real], [])
    assert e.value.exit_code == 2
    check_images_for_real_rigs([virtual], [])
    check_images_for_real_rigs([real], ["/images/raspios-lite.img"])
    check_images_for_real_rigs([real], ["cm4=/images/raspios-lite.img"])
    with pytest.raises(InputError):
        check_images_for_real_rigs([real], ["cm5=/images/raspios-lite.img"])


@pytest.mark.parametrize("model", ["cm1", "cm3", "cm4", "cm5"])
def test_shipped_virtual_rigs_have_the_smallest_real_emmc(model: str) -> None:
    rig = load_rig(REPO / "rigs" / f"virtual-{model}.toml")
    smallest = min(rig.model.emmc_sizes)
    assert emmc_size_plausible(rig.model, rig.emmc_size) and rig.emmc_size <= smallest
    assert rig.emmc_size > 2.7 * 1024**3  # a stock Raspberry Pi OS Lite image (about 2.7 GiB raw) fits
