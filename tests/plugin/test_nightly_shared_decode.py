"""The nightly job on four virtual rigs given one .xz decodes it once (issue 21): one rig's flash runs the decoder
into the image cache, the three others follow that decode or read its result, and each rig's flash figures in the
report say which it was."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from hil.image.build import ImageSpec, build_image
from tests.hilrun import hil

MiB = 1024**2
PORTS = {"cm1": "12-1.1", "cm3": "12-1.3", "cm4": "12-1.4", "cm5": "12-1.5"}


def test_the_nightly_on_four_rigs_decodes_the_shared_image_once(make_rig: Callable[..., Path], wrapper: str,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_CACHE_DIR", str(tmp_path / "cache"))  # cold: the night's first flash of this image
    image = build_image(tmp_path / "night.img", ImageSpec(size=128 * MiB, boot_size=48 * MiB, fill=24 * MiB,
                                                          compress=("xz",))).compressed["xz"]
    rigs = [arg for model, port in PORTS.items() for arg in ("--rig", str(make_rig(f"shared-{model}", model, port)))]
    report = tmp_path / "night"
    done = hil("nightly", *rigs, "--image", str(image), "--report-dir", str(report), "--no-history", "--",
               "-k", "test_image_is_written_and_verified", timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "tests: 4 passed" in done.stdout
    figures = {a.read_text(errors="replace") for a in (report / "allure-results").glob("*-attachment*")}
    plans = []  # the "plan" line of each rig's flash figures (attached to the flash and to the test that uses it)
    for text in figures:
        if "verified by" in text:
            plans += re.findall(r"^plan +(.+)$", text, re.MULTILINE)
    assert len(plans) == 4, plans
    decoded = [p for p in plans if "from the image cache" not in p]
    assert decoded == ["filesystems"], plans  # one decoder, reading the image's filesystems as it decodes
    assert all(p in ("shared decode (from the image cache)", "cache (from the image cache)") for p in plans
               if p not in decoded), plans
