"""Holder names: what a stuck place says about who left it, and when this host may release it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hil.lab.coordinator import Holder, ci_job, coordinator_address


@pytest.mark.parametrize(("env", "job"), [
    ({"HIL_HOLDER": "nightly"}, "nightly"),
    ({"CI_JOB_NAME": "hil lab", "CI_JOB_ID": "4711"}, "hil lab#4711"),
    ({"GITHUB_WORKFLOW": "nightly", "GITHUB_RUN_ID": "99"}, "nightly#99"),
    ({"JOB_NAME": "cm4/nightly", "BUILD_NUMBER": "12"}, "cm4/nightly#12"),
])
def test_the_holder_is_named_after_the_ci_job(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], job: str) -> None:
    for name in ("HIL_HOLDER", "CI_JOB_NAME", "CI_JOB_ID", "GITHUB_WORKFLOW", "GITHUB_RUN_ID", "JOB_NAME",
                 "BUILD_NUMBER", "BUILDKITE_PIPELINE_SLUG", "BUILDKITE_BUILD_NUMBER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LG_HOSTNAME", "ctl-1")
    assert ci_job() == job
    holder = Holder.this_process()
    assert "/" not in holder.job and " " not in holder.job  # labgrid splits HOST/USER at the slash
    assert str(holder) == f"ctl-1/{holder.job}@{os.getpid()}"
    assert Holder.parse(str(holder)) == holder


def test_only_a_dead_process_of_this_host_counts_as_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LG_HOSTNAME", "ctl-1")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert Holder("ctl-1", "job", gone.pid).is_dead_here()
    assert not Holder("ctl-1", "job", os.getpid()).is_dead_here()  # alive
    assert not Holder("ctl-2", "job", gone.pid).is_dead_here()  # another host's pid says nothing here
    assert not Holder.parse("ctl-1/root").is_dead_here()  # a person or `hil lab reserve`: never released for them


@pytest.mark.parametrize(("address", "allowed", "normal"), [
    ("127.0.0.1", False, "127.0.0.1:20408"), ("localhost:5", False, "localhost:5"), ("[::1]:7", False, "[::1]:7"),
    ("10.0.0.2:20408", True, "10.0.0.2:20408"), ("lab.example", True, "lab.example:20408"),
])
def test_coordinator_addresses(address: str, allowed: bool, normal: str) -> None:
    assert coordinator_address(address, allow_remote=allowed) == normal


@pytest.mark.parametrize("address", ["10.0.0.2", "lab.example:20408", "127.0.0.1.nip.io", "0.0.0.0"])
def test_off_loopback_is_refused_by_default(address: str) -> None:
    from hil.errors import InputError

    with pytest.raises(InputError, match="no authentication"):
        coordinator_address(address, allow_remote=False)
