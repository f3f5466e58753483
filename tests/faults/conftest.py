"""The fault matrix's shared pieces: a virtual CM4 held in mass-storage mode, and small test images."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hil.image.build import BuiltImage, ImageSpec, build_image
from hil.rig import Rig, load_rig
from tests.rigfiles import virtual_rig_toml

MiB = 1024**2
EMMC = 256 * MiB


@dataclass
class MassStorage:
    """A virtual module in mass-storage mode: its rig, its disk's backing block device and its eMMC file."""

    rig: Rig
    block_device: str
    emmc: Path

    def emmc_sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.emmc, "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        return h.hexdigest()


def rig_file(folder: Path, name: str, port: str, gpios: tuple[int, int], payload: Path | None = None) -> Path:
    path = folder / f"{name}.toml"
    usb = {"payload": str(payload)} if payload else {}
    path.write_text(virtual_rig_toml(name, "cm4", port, state_dir=folder / "state", emmc=f"{EMMC // MiB}MiB",
                                     power_gpio=gpios[0], boot_gpio=gpios[1], nwp_gpio=None, off_time=0.01,
                                     baud=115200, timeouts={"mass_storage": 5, "kernel": 5}, speedup=50.0,
                                     extra={"relays": {"pin_factory": "mock"}, "usb": usb}))
    return path


def mass_storage(folder: Path, name: str, port: str, gpios: tuple[int, int]) -> Iterator[MassStorage]:
    """Power the module with nRPI_BOOT asserted and USB-boot it; it stays a USB disk until the end."""
    from hil.control.relays import RelayBank
    from hil.usbboot.host import UsbBoot
    from hil.virtual.rig import VirtualRig
    from hil.virtual.usb.payloads import make_payload

    payload = make_payload(folder / "payload", "mass-storage-gadget64", ("cm4",), boot_img_size=MiB)
    rig = load_rig(rig_file(folder, name, port, gpios, payload))
    with VirtualRig(rig) as virtual, RelayBank(rig.relays) as relays:
        assert relays.nrpi_boot is not None and relays.power is not None
        relays.nrpi_boot.set(True)
        relays.power.set(True)
        UsbBoot.for_rig(rig, settle=0.01).run()
        yield MassStorage(rig, virtual.emmc.block_device, virtual.emmc.image_path)


@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A Raspberry Pi OS-shaped 64 MiB image with a .bmap (checksummed ranges)."""
    spec = ImageSpec(size=64 * MiB, boot_size=36 * MiB, fill=MiB, bmap=True)
    return build_image(tmp_path_factory.mktemp("small") / "small.img", spec)


@pytest.fixture(scope="session")
def other_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """Another image of the same size (another build id), with its own .bmap."""
    spec = ImageSpec(size=64 * MiB, boot_size=36 * MiB, fill=2 * MiB, bmap=True)
    return build_image(tmp_path_factory.mktemp("other") / "other.img", spec)
