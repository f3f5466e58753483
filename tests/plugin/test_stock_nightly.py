"""The nightly job on stock-shaped Raspberry Pi OS images: customised at flash time, then booted and identified (user
login, os-release, the run's token) on the virtual CM3, CM4 and CM5."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hilrun import hil
from tests.stockimage import PRETTY_NAME, build_stock_image

MODELS = {"cm3": "10-1.3", "cm4": "10-1.4", "cm5": "10-1.5"}


def test_nightly_flashes_customises_and_identifies_stock_images(make_rig: Callable[..., Path], wrapper: str,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_LOGIN_PASSWORD", "nightly-pw")
    rigs, images = [], []
    for model, port in MODELS.items():
        # the factory bootloader config (BOOT_UART=0): no bootloader lines are expected
        rigs += ["--rig", str(make_rig(f"stock-{model}", model, port, extra="[customise]\nbootloader_uart = false\n"))]
        images += ["--image", f"{model}={build_stock_image(tmp_path / f'stock-{model}.img', model).path}"]
    report = tmp_path / "night"
    done = hil("nightly", *rigs, *images, "--report-dir", str(report), "--no-history", "--",
               "-k", "test_flash_and_boot", timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "nightly-pw" not in done.stdout + done.stderr
    identities = {}
    for path in (report / "allure-results").glob("*-result.json"):
        result = json.loads(path.read_text())
        if result["name"].startswith("test_the_booted_system_is_the_flashed_image"):
            rig = next(label["value"] for label in result["labels"] if label["name"] == "rig")
            assert result["status"] == "passed", result.get("statusDetails")
            identities[rig] = result
    assert set(identities) == {f"stock-{m}" for m in MODELS}
    texts = [p.read_text() for p in (report / "allure-results").glob("*-attachment*")]
    assert sum(f"PRETTY_NAME: {PRETTY_NAME}" in t and "user: hil" in t and "token: " in t for t in texts) == 3
