"""Virtual rigs for the rig-control tests: fast (speed-up 20), small eMMCs, short stage timeouts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.control.lifecycle import Lifecycle
from hil.hostenv import umockdev_active
from hil.image.build import BuiltImage, ImageSpec, build_image
from hil.models import MODELS
from hil.rig import Rig, load_rig
from hil.virtual.rig import VirtualRig
from tests.rigfiles import virtual_rig_toml

MiB = 1024**2
PORTS = {"cm1": "1-1.2", "cm3": "1-1.3", "cm4": "1-1.4", "cm5": "1-1.5"}
#: Host seconds; at speed-up 20 a module boots to login in under a second.
TIMEOUTS = {"power": 5, "rom": 3, "bootloader": 2, "kernel": 3, "login": 4, "command": 3}


@pytest.fixture
def needs_usb() -> None:
    """Skip unless libusb and udev reach the virtual USB bus (pytest runs under umockdev-wrapper)."""
    if not umockdev_active():
        pytest.skip("needs umockdev: run pytest under umockdev-wrapper")


@pytest.fixture
def make_rig(tmp_path: Path) -> Callable[..., Rig]:
    """make_rig(model, extra=..., timeouts=...) -> a virtual rig file under tmp_path, loaded."""

    def make(model: str, extra: str = "", name: str | None = None, timeouts: dict[str, float] | None = None) -> Rig:
        path = tmp_path / f"{name or model}.toml"
        # CM4/CM5 modules here were configured with BOOT_UART=1 (their factory config has 0), so the bootloader
        # milestone and its failures can be tested
        configured = MODELS[model].has_eeprom and "[customise]" not in extra
        uart = "[customise]\nbootloader_uart = true\n" if configured else ""
        path.write_text(virtual_rig_toml(name or f"rc-{model}", model, PORTS[model],
                                         state_dir=tmp_path / f"state-{name or model}", off_time=0.1, baud=115200,
                                         timeouts={**TIMEOUTS, **(timeouts or {})}, loop_device=False,
                                         extra=uart + extra))
        return load_rig(path)

    return make


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


_built: dict[tuple[str, str, tuple[str, ...]], BuiltImage] = {}


class Bench:
    """A virtual module and its rig, with images written onto its eMMC natively (as an eMMC programmer
    would; flashing through USB mass storage is tested elsewhere)."""

    def __init__(self, rig: Rig, vrig: VirtualRig, image_dir: Path, tmp: Path):
        self.rig, self.vrig, self.image_dir, self.tmp = rig, vrig, image_dir, tmp

    def image(self, build_id: str, cmdline: tuple[str, ...] = ()) -> BuiltImage:
        key = (self.rig.model.name, build_id, cmdline)
        if key not in _built:
            spec = ImageSpec(model=self.rig.model.name, build_id=build_id, size=64 * MiB, boot_size=36 * MiB,
                             cmdline=cmdline)
            _built[key] = build_image(self.image_dir / f"{len(_built)}-{self.rig.model.name}.img", spec)
        return _built[key]

    def writer(self, build_id: str, cmdline: tuple[str, ...] = ()) -> Callable[[], None]:
        """A ``write`` for Lifecycle.flash: the image onto the eMMC's backing file."""
        image = self.image(build_id, cmdline)

        def write() -> None:
            assert not self.vrig.module.powered, "the eMMC is written natively only while the module is off"
            with open(image.path, "rb") as src, open(self.vrig.emmc.image_path, "r+b") as dst:
                while chunk := src.read(4 * MiB):
                    dst.write(chunk)

        return write

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.rig, log_dir=self.tmp / "logs")


@pytest.fixture
def bench(make_rig: Callable[..., Rig], image_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Bench]]:
    """bench(model, extra=rig-file text, timeouts=...) -> a Bench whose virtual module is up until the test ends."""
    opened: list[VirtualRig] = []

    def make(model: str, extra: str = "", timeouts: dict[str, float] | None = None) -> Bench:
        rig = make_rig(model, extra, timeouts=timeouts)
        vrig = VirtualRig(rig).open()
        opened.append(vrig)
        return Bench(rig, vrig, image_dir, tmp_path)

    yield make
    for vrig in reversed(opened):
        vrig.close()
