"""The customisation step on its own: what it plans per model, where the password may come from, and the images it
refuses before anything is written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hil.errors import InputError, RigFileError
from hil.flash import customise
from hil.flash.sources import open_image
from hil.image import fat
from hil.image.mbr import read_layout
from hil.rig import load_rig
from tests.rigfiles import virtual_rig_toml
from tests.stockimage import build_stock_image


def _rig(tmp_path: Path, model: str = "cm4", extra: str = "") -> object:
    path = tmp_path / "rig.toml"
    path.write_text(virtual_rig_toml("cust", model, "1-1.4", state_dir=tmp_path / "state", extra=extra))
    return load_rig(path)


def test_the_hash_is_sha512_crypt_that_openssl_verifies() -> None:
    hashed = customise.sha512_crypt("pw 1")
    assert hashed.startswith("$6$")
    salt = hashed.split("$")[2]
    again = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input=b"pw 1", capture_output=True,
                           check=True).stdout.decode().strip()
    assert again == hashed


def test_plan_per_model_and_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_LOGIN_PASSWORD", "pw")
    cm4 = customise.plan(_rig(tmp_path))  # type: ignore[arg-type]
    assert cm4.config == {"enable_uart": "1"} and cm4.console == "console=serial0,115200"
    assert cm4.hostname == "cust" and cm4.user == "hil" and "pw" not in repr(cm4) and "$6$" not in repr(cm4)
    cm5 = customise.plan(_rig(tmp_path, "cm5", '[customise]\nuart = "uart0"\n'))  # type: ignore[arg-type]
    assert cm5.config == {"enable_uart": "1", "dtparam": "uart0_console"}
    assert customise.plan(_rig(tmp_path, "cm5")).config == {"enable_uart": "1"}  # type: ignore[arg-type]


def test_the_rig_file_never_holds_the_password(tmp_path: Path) -> None:
    with pytest.raises(RigFileError, match="must not be written in a rig file"):
        _rig(tmp_path, extra='[customise]\npassword = "x"\n')
    with pytest.raises(RigFileError, match="customise.user"):
        _rig(tmp_path, extra='[customise]\nuser = "Root"\n')
    with pytest.raises(RigFileError, match="customise.uart"):
        _rig(tmp_path, "cm4", extra='[customise]\nuart = "uart0"\n')


def test_a_password_file_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIL_LOGIN_PASSWORD", raising=False)
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    os.chmod(secret, 0o644)
    rig = _rig(tmp_path, extra=f'[customise]\npassword_file = "{secret}"\n')
    with pytest.raises(InputError, match="only you can read"):
        customise.login_password(rig)  # type: ignore[arg-type]
    os.chmod(secret, 0o600)
    assert customise.login_password(rig) == "from-file"  # type: ignore[arg-type]
    link = tmp_path / "link"
    link.symlink_to(secret)
    linked = _rig(tmp_path, extra=f'[customise]\npassword_file = "{link}"\n')
    with pytest.raises(InputError, match="not as a symlink"):
        customise.login_password(linked)  # type: ignore[arg-type]


def test_a_virtual_rig_without_a_password_gets_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIL_LOGIN_PASSWORD", raising=False)
    rig = _rig(tmp_path)
    first = customise.login_password(rig)  # type: ignore[arg-type]
    assert first and customise.login_password(rig) == first  # type: ignore[arg-type]
    assert (tmp_path / "state" / "login-password").stat().st_mode & 0o077 == 0


def test_an_image_without_a_fat_boot_partition_is_refused_before_the_write(tmp_path: Path) -> None:
    image = build_stock_image(tmp_path / "stock.img", "cm4")
    customise.check_image(open_image(image.path, 1 << 30))
    no_fat = tmp_path / "nofat.img"
    no_fat.write_bytes(image.path.read_bytes())
    subprocess.run(["sfdisk", "--quiet", "--part-type", str(no_fat), "1", "83"], check=True, capture_output=True)
    with pytest.raises(InputError, match="no partition is typed FAT.*--no-customise") as e:
        customise.check_image(open_image(no_fat, 1 << 30))
    assert e.value.exit_code == 2


def test_a_full_boot_partition_is_refused_before_the_write(tmp_path: Path) -> None:
    image = build_stock_image(tmp_path / "stock.img", "cm4")
    filler = tmp_path / "filler"
    with open(filler, "wb") as f:  # fill the FAT up to a few KiB
        f.truncate(fat.free_bytes(image.path, read_layout(image.path).partitions[0]) - 8 * 1024)  # type: ignore[operator]
    subprocess.run(["mcopy", "-i", f"{image.path}@@{4 * 1024**2}", str(filler), "::/filler"], check=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    with pytest.raises(InputError, match="bytes free.*--no-customise"):
        customise.check_image(open_image(image.path, 1 << 30))
