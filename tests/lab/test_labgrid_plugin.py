"""The labgrid plugins: a labgrid environment with a RemotePlace drives a rig of the loopback lab through
CmHilStrategy (flash, boot and prove the build, then off), in a pytest run under labgrid's own pytest plugin,
while the place is held by the labgrid client that acquired it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.hilrun import hil, hil_command

TEST = """
import os

def test_flash_boot_off(target, strategy):
    strategy.transition("booted")
    assert strategy.boot_record["build_id"] == os.environ["EXPECT_BUILD_ID"]
    strategy.transition("off")
"""


def test_a_labgrid_environment_flashes_and_boots_a_lab_rig(serve, lab_rig, coordinator: str,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    from hil.lab.coordinator import Coordinator

    rig = lab_rig("lab-p", "24-1", emmc="128MiB")
    serve("ctl-1", [rig])
    image = tmp_path / "test.img"
    built = hil("image", "build", str(image), "--model", "cm4", "--size", "96MiB", "--build-id", "lab0build1")
    assert built.returncode == 0, built.stderr

    argv, env = hil_command()
    env = {**env, "LG_USERNAME": "tester", "LG_COORDINATOR": coordinator}
    acquired = subprocess.run([sys.executable, "-m", "labgrid.remote.client", "-p", "lab-p", "acquire"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    assert acquired.returncode == 0, acquired.stderr

    (tmp_path / "env.yaml").write_text(f"""
options:
  coordinator_address: "{coordinator}"
imports:
  - hil.lab.labgrid_plugin
images:
  root: "{image}"
targets:
  main:
    resources:
      RemotePlace:
        name: lab-p
    drivers:
      CmHilDriver: {{}}
      CmHilStrategy:
        image: root
""")
    (tmp_path / "test_with_labgrid.py").write_text(TEST)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--lg-env",
                          str(tmp_path / "env.yaml"), str(tmp_path / "test_with_labgrid.py")],
                         env={**env, "EXPECT_BUILD_ID": "lab0build1"}, cwd=tmp_path, capture_output=True,
                         text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    with Coordinator(coordinator) as lab:
        assert lab.place("lab-p").acquired.endswith("/tester")  # the client's still: the flows used it, no more
