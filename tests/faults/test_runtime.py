"""Fault matrix, runtime folder: another local user who makes our runtime folder first, or plants symlinks in it,
gets nothing truncated or overwritten; what we create there (and console logs) is private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hil.control.console import Console
from hil.control.lifecycle import ModuleState, RigLock, StateFile
from hil.errors import InfrastructureError
from hil.rig import Rig, load_rig
from hil.runtime import default_runtime_dir
from tests.rigfiles import virtual_rig_toml

NOBODY = 65534
VICTIM_TEXT = b"root:secret\n"


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    path = tmp_path / "rig.toml"
    path.write_text(virtual_rig_toml("faultrig", "cm4", "3-1.2", state_dir=tmp_path / "state"))
    return load_rig(path)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM_TEXT)
    return path


def _runtime(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Path:
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(folder))
    return folder


def test_a_runtime_folder_made_by_another_user_is_refused(rig: Rig, victim: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a folder to another user")
    planted = _runtime(monkeypatch, tmp_path / "shared")
    (planted / rig.name).mkdir(parents=True)
    (planted / rig.name / "lock").symlink_to(victim)
    (planted / rig.name / "state.tmp").symlink_to(victim)
    for folder in (planted, planted / rig.name):
        os.chown(folder, NOBODY, NOBODY)
        os.chmod(folder, 0o777)
    with pytest.raises(InfrastructureError, match="refusing to use .*shared.*owned by uid 65534"):
        RigLock(rig).acquire()
    with pytest.raises(InfrastructureError, match="refusing to use"):
        StateFile(rig).write(relays_on=True, state=ModuleState.OFF)
    assert victim.read_bytes() == VICTIM_TEXT


def test_symlinks_planted_in_our_own_folder_are_not_followed(rig: Rig, victim: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run = _runtime(monkeypatch, tmp_path / "run")
    (run / rig.name).mkdir(parents=True, mode=0o700)
    os.chmod(run, 0o700)
    (run / rig.name / "lock").symlink_to(victim)
    with pytest.raises(InfrastructureError, match="lock: it is a symbolic link"):
        RigLock(rig).acquire()
    (run / rig.name / "lock").unlink()
    (run / rig.name / "state.tmp").symlink_to(victim)
    with pytest.raises(InfrastructureError, match="state.tmp: it is a symbolic link"):
        StateFile(rig).write(relays_on=False, state=ModuleState.OFF)
    assert victim.read_bytes() == VICTIM_TEXT


def test_a_group_writable_runtime_folder_is_refused(rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _runtime(monkeypatch, tmp_path / "run")
    run.mkdir()
    os.chmod(run, 0o775)
    with pytest.raises(InfrastructureError, match="writable by group or others"):
        RigLock(rig).acquire()


def test_lock_state_and_console_log_are_private(rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _runtime(monkeypatch, tmp_path / "fresh" / "run")
    lock = RigLock(rig)
    lock.acquire()
    try:
        StateFile(rig).write(relays_on=False, state=ModuleState.OFF)
        assert StateFile(rig).read()["state"] == "off"
    finally:
        lock.release()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run, run / rig.name, run / rig.name / "lock",
                                                             run / rig.name / "state.json")}
    assert modes == {"run": 0o700, rig.name: 0o700, "lock": 0o600, "state.json": 0o600}
    log = tmp_path / "logs" / "console.log"
    with Console("loop://", 115200, log_path=log):
        pass
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_the_default_runtime_folder_is_private_to_its_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HIL_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_runtime_dir() == tmp_path / "cm-hil"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_runtime_dir() == (Path("/run/cm-hil") if os.geteuid() == 0 else Path(f"/tmp/cm-hil-{os.getuid()}"))
