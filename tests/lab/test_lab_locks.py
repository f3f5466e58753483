"""The loopback lab: reservation by tag across two controllers, refusal of a held place, a killed holder, and
the refusal of a coordinator off loopback. Everything through the ``hil`` command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.hilrun import hil, hil_command
from tests.lab.conftest import Processes, wait_for


def as_job(job: str, *args: str, host: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv, env = hil_command(*args)
    env = {**env, "HIL_HOLDER": job, **({"LG_HOSTNAME": host} if host else {})}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def holders(coordinator: str) -> dict[str, str]:
    from hil.lab.coordinator import Coordinator

    with Coordinator(coordinator) as lab:
        return {name: view.acquired or "" for name, view in lab.places().items()}


@pytest.fixture
def two_controllers(serve, lab_rig) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    a = lab_rig("lab-a", "20-1", tags={"carrier": "cm4io"})
    b = lab_rig("lab-b", "21-1", tags={"carrier": "cm4io"})
    serve("ctl-1", [a], site="room-1")
    serve("ctl-2", [b], site="room-2")
    return a, b


def test_places_carry_rig_controller_site_and_tags(two_controllers, coordinator: str) -> None:
    listing = hil("lab", "list", "--coordinator", coordinator, "carrier=cm4io")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["lab-a"][:6] == ["lab-a", "lab-a", "ctl-1", "room-1", "cm4", "free"]
    assert rows["lab-b"][:6] == ["lab-b", "lab-b", "ctl-2", "room-2", "cm4", "free"]
    none = hil("lab", "list", "--coordinator", coordinator, "site=room-9")
    assert none.returncode == 0 and len(none.stdout.splitlines()) == 1


def test_two_jobs_get_different_rigs_and_a_third_is_refused_or_waits(two_controllers, coordinator: str,
                                                                      processes: Processes) -> None:
    first = as_job("job-1", "lab", "reserve", "--coordinator", coordinator, "model=cm4", "carrier=cm4io")
    second = as_job("job-2", "lab", "reserve", "--coordinator", coordinator, "model=cm4", "carrier=cm4io")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    held = holders(coordinator)
    assert sorted(held.values()) == sorted([f"{os.uname().nodename}/job-1", f"{os.uname().nodename}/job-2"])

    third = as_job("job-3", "lab", "reserve", "--coordinator", coordinator, "model=cm4")
    assert third.returncode == 3, third.stderr
    assert "job-1" in third.stderr and "job-2" in third.stderr  # who holds them, so it can be traced

    place = next(name for name, who in held.items() if who.endswith("/job-1"))
    argv, env = hil_command("lab", "reserve", "--coordinator", coordinator, "--wait", "30", "model=cm4")
    waiting = processes.start(argv, env={**env, "HIL_HOLDER": "job-3"})
    time.sleep(1.0)
    assert waiting.poll() is None  # it waits for a place to come free
    refused = as_job("job-3", "lab", "release", "--coordinator", coordinator, place)
    assert refused.returncode == 3 and "job-1" in refused.stderr  # not this job's to release
    released = as_job("job-1", "lab", "release", "--coordinator", coordinator, place)
    assert released.returncode == 0, released.stderr
    assert waiting.wait(30) == 0
    assert holders(coordinator)[place].endswith("/job-3")


def power_on(processes: Processes, rig: Path, job: str, host: str | None = None) -> subprocess.Popen[str]:
    argv, env = hil_command("power", "on", "--rig", str(rig))
    env = {**env, "HIL_HOLDER": job, **({"LG_HOSTNAME": host} if host else {})}
    return processes.start(argv, env=env)


def test_a_killed_holder_on_this_host_is_released(two_controllers, coordinator: str, processes: Processes) -> None:
    rig, _ = two_controllers
    holder = power_on(processes, rig, "nightly-7")
    held = wait_for("lab-a held", lambda: holders(coordinator)["lab-a"], timeout=60)
    assert "nightly-7@" in str(held)
    busy = as_job("other", "power", "off", "--rig", str(rig))
    assert busy.returncode == 3 and str(held) in busy.stderr and "hil lab release lab-a" in busy.stderr

    processes.kill(holder, signal.SIGKILL)  # no cleanup runs: labgrid keeps the place acquired
    assert holders(coordinator)["lab-a"] == held
    after = as_job("other", "power", "off", "--rig", str(rig))
    assert after.returncode == 0, after.stderr
    assert f"held by {held}" in after.stderr and "no longer runs" in after.stderr
    assert holders(coordinator)["lab-a"] == ""


def test_a_holder_on_another_controller_is_reported_not_released(two_controllers, coordinator: str,
                                                                  processes: Processes) -> None:
    rig, _ = two_controllers
    holder = power_on(processes, rig, "nightly-8", host="controller-9")
    held = wait_for("lab-a held", lambda: holders(coordinator)["lab-a"], timeout=60)
    processes.kill(holder, signal.SIGKILL)
    refused = as_job("other", "power", "off", "--rig", str(rig))
    assert refused.returncode == 3, refused.stderr
    assert f"in use by {held}" in refused.stderr and "controller-9/nightly-8@" in refused.stderr
    kicked = as_job("other", "lab", "release", "--coordinator", coordinator, "--kick", "lab-a")
    assert kicked.returncode == 0 and f"was held by {held}" in kicked.stdout


def test_a_coordinator_off_loopback_is_refused_unless_allowed(tmp_path: Path) -> None:
    from tests.rigfiles import virtual_rig_toml

    rig = tmp_path / "remote.toml"
    rig.write_text(virtual_rig_toml("remote", "cm4", "22-1", extra={"lab": {"lock": "labgrid",
                                                                            "coordinator": "192.0.2.7:20408"}}))
    refused = hil("rig", "check", str(rig))
    assert refused.returncode == 2 and "lab.coordinator" in refused.stderr and "SSH tunnel" in refused.stderr
    rig.write_text(virtual_rig_toml("remote", "cm4", "22-1", extra={"lab": {
        "lock": "labgrid", "coordinator": "192.0.2.7:20408", "allow_remote_coordinator": True}}))
    assert hil("rig", "check", str(rig)).returncode == 0
    started = time.monotonic()
    listing = hil("lab", "list", "--coordinator", "192.0.2.7")
    assert listing.returncode == 2 and "loopback" in listing.stderr
    assert time.monotonic() - started < 10  # refused before any connection attempt


def test_the_exporter_config_describes_each_rig_for_labgrid(tmp_path: Path, lab_rig) -> None:  # type: ignore[no-untyped-def]
    import yaml

    a = lab_rig("lab-c", "23-1", tags={"carrier": "cm4io"})
    out = tmp_path / "exporter.yaml"
    argv, env = hil_command("lab", "serve", "--controller", "ctl-3", "--site", "room-3", "--rig", str(a),
                            "--config-out", str(out), "--coordinator", "10.1.2.3:20408")
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "loopback" in refused.stderr and not out.exists()  # refused before writing

    from hil.lab.exporter import exporter_config, places
    from hil.rig import load_rig

    rig = load_rig(a)
    config = yaml.safe_load(yaml.safe_dump(exporter_config([rig], controller="ctl-3", site="room-3")))
    group = config["lab-c"]
    assert group["location"] == "room-3/ctl-3"
    params = group["CmHilRig"]
    assert params["rig_file"] == str(a.resolve()) and params["controller"] == "ctl-3"
    assert params["usb_port"] == "23-1" and params["console"] == rig.console.device
    assert (params["power_gpio"], params["nrpi_boot_gpio"], params["eeprom_nwp_gpio"]) == (17, 27, 22)
    assert all(isinstance(v, str | int | float | bool) for v in params.values())  # what labgrid can carry
    place = places([rig], controller="ctl-3", site="room-3")["lab-c"]
    assert place["match"] == "ctl-3/lab-c/CmHilRig"
    assert place["tags"] == {"model": "cm4", "rig": "lab-c", "controller": "ctl-3", "site": "room-3",
                             "carrier": "cm4io"}
