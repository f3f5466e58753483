"""Stock Raspberry Pi OS on a rig: `hil flash` customises it (console, user, hostname, token) and `hil boot` logs in as
that user and identifies it; with --no-customise the same image is refused at boot because its console is off."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hil.cli import main as hil_main
from hil.image import ext4, fat
from hil.image.mbr import read_layout
from hil.models import MODELS
from hil.rig import Rig, load_rig
from tests.rigfiles import virtual_rig_toml
from tests.stockimage import PRETTY_NAME, TRIXIE_PRETTY_NAME, VERSION_ID, build_stock_image

if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", "") or os.geteuid() != 0:
    pytest.skip("needs root and umockdev: run pytest under umockdev-wrapper as root", allow_module_level=True)

from hil.virtual.rig import VirtualRig  # noqa: E402
from hil.virtual.usb.payloads import make_payload  # noqa: E402

PORTS = {"cm3": "8-1.3", "cm4": "8-1.4", "cm5": "8-1.5"}
TIMEOUTS = {"power": 5, "rom": 5, "mass_storage": 8, "kernel": 5, "login": 6, "command": 4}


def _rig(folder: Path, model: str, extra: dict[str, object] | None = None, name: str = "") -> Rig:
    kind = "msd" if MODELS[model].chip_dir == "2710" else "mass-storage-gadget64"
    payload = make_payload(folder / "payload", kind, (model,), boot_img_size=1024**2)
    path = folder / "rig.toml"
    path.write_text(virtual_rig_toml(name or f"stock-{model}", model, PORTS[model], state_dir=folder / "state",
                                     emmc="128MiB", power_gpio=5, boot_gpio=6, nwp_gpio=None, off_time=0.01,
                                     timeouts=TIMEOUTS, speedup=50.0,
                                     extra={"usb": {"payload": str(payload)}, **(extra or {})}))
    return load_rig(path)


@pytest.mark.parametrize("model", ["cm3", "cm4", "cm5"])
def test_stock_image_flashed_with_customisation_boots_and_is_identified(
        model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_LOGIN_PASSWORD", "s3cret-pw")
    image = build_stock_image(tmp_path / "stock.img", model)
    rig = _rig(tmp_path, model)
    with VirtualRig(rig) as virtual:
        assert hil_main(["flash", str(image.path), "--rig", str(rig.path), "--no-cache"]) == 0
        out = capsys.readouterr().out
        assert "custom  config.txt: enable_uart=1" in out and "userconf.txt: user hil" in out
        assert "s3cret-pw" not in out and "$6$" not in out  # neither the password nor its hash is shown
        layout = read_layout(virtual.emmc.image_path)
        userconf = fat.read_file(virtual.emmc.image_path, layout.partitions[0], "userconf.txt") or b""
        assert userconf.startswith(b"hil:$6$")
    assert hil_main(["boot", "--rig", str(rig.path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    identity = record["identity"]
    assert identity["user"] == "hil" and identity["sudo"] == "yes"  # the first user may act as root
    assert identity["PRETTY_NAME"] == PRETTY_NAME and identity["VERSION_ID"] == VERSION_ID
    assert identity["root"] == f"PARTUUID={image.root_partuuid}"
    assert len(identity["token"]) == 16 and identity["issue.txt"].startswith("Raspberry Pi reference")
    assert "kernel" not in record["markers"]  # quiet: no kernel lines to wait for
    assert set(record["markers"]) >= {"login", "shell"}
    # the first boot took userconf.txt (user created, file removed), as userconf-pi does
    layout = read_layout(rig.virtual.state_dir / "emmc.img")  # type: ignore[union-attr]
    assert fat.read_file(rig.virtual.state_dir / "emmc.img", layout.partitions[0], "userconf.txt") is None  # type: ignore[union-attr]


def test_trixie_image_gets_cloud_init_user_data_and_boots(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A Trixie-shaped image (cloud-init files on its boot partition) also gets user-data and a new instance-id."""
    monkeypatch.setenv("HIL_LOGIN_PASSWORD", "trixie-pw")
    image = build_stock_image(tmp_path / "trixie.img", "cm5", trixie=True)
    rig = _rig(tmp_path, "cm5", name="trixie-cm5")  # its own lock: other tests here may run at the same time
    with VirtualRig(rig) as virtual:
        assert hil_main(["flash", str(image.path), "--rig", str(rig.path), "--no-cache"]) == 0
        out = capsys.readouterr().out
        assert "user-data: cloud-init: user hil, hostname trixie-cm5" in out
        assert "meta-data: cloud-init instance-id" in out
        layout = read_layout(virtual.emmc.image_path)
        user_data = (fat.read_file(virtual.emmc.image_path, layout.partitions[0], "user-data") or b"").decode()
        assert user_data.startswith("#cloud-config\n") and '"$6$' in user_data
    assert hil_main(["boot", "--rig", str(rig.path), "--json"]) == 0
    identity = json.loads(capsys.readouterr().out)["identity"]
    assert identity["user"] == "hil" and identity["PRETTY_NAME"] == TRIXIE_PRETTY_NAME
    emmc = rig.virtual.state_dir / "emmc.img"  # type: ignore[union-attr]
    ran = ext4.read_file(emmc, read_layout(emmc).partitions[1], "/var/lib/cloud/data/instance-id")
    assert ran == f"hil-{identity['token']}\n".encode()  # cloud-init ran for this flash's instance


def test_no_customise_fails_fast_saying_the_console_is_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = build_stock_image(tmp_path / "stock.img", "cm4")
    rig = _rig(tmp_path, "cm4", name="nocustomise-cm4")
    with VirtualRig(rig):
        assert hil_main(["flash", str(image.path), "--rig", str(rig.path), "--no-cache", "--no-customise"]) == 0
        assert "enable_uart" in capsys.readouterr().err
    assert hil_main(["boot", "--rig", str(rig.path)]) == 2
    err = capsys.readouterr().err
    assert "serial console off" in err and "enable_uart=1" in err


def test_a_real_rig_without_a_password_is_refused_before_anything(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIL_LOGIN_PASSWORD", raising=False)
    image = build_stock_image(tmp_path / "stock.img", "cm4")
    rig = _rig(tmp_path, "cm4", {"customise": {"password_file": str(tmp_path / "missing")}}, name="nopassword-cm4")
    assert hil_main(["flash", str(image.path), "--rig", str(rig.path)]) == 2
    assert "password file" in capsys.readouterr().err
