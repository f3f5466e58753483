"""A real rig is never given the stand-in test image: without --image it is refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.errors import InputError
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
