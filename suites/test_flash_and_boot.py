"""Flash and boot: write the image over USB mass storage, verify it, check its partitions, power-cycle into
it and prove over the console that the module runs the image just written; record the boot times.

The image is written once per rig and run (the ``flashed`` fixture); every test here reports on that one write.
"""

from __future__ import annotations

import allure
import pytest
from hil.fixtures.images import FlashImage
from hil.fixtures.station import FlashRecord, RigStation

from hil.control.bootconfirm import BootRecord, boot_markers
from hil.rig import Rig

pytestmark = pytest.mark.needs("nrpi_boot")  # flashing goes through USB boot into mass storage


def test_image_is_written_and_verified(flashed: FlashRecord, flash_image: FlashImage) -> None:
    assert flashed.write.bytes_written > 0
    assert flashed.verify.bytes_read == flashed.write.bytes_written
    if flash_image.built:  # the build-id read back from the disk is the one built into the image
        assert flashed.build_id == flash_image.build_id


def test_partitions_are_those_of_the_image(flashed: FlashRecord) -> None:
    parts = flashed.partitions
    assert parts.boot_fat.startswith("FAT")
    assert parts.root.start > parts.boot.start


def test_power_cycle_boots_the_flashed_image(station: RigStation, flashed: FlashRecord) -> None:
    record = station.boot(flashed.build_id, power_cycle=True)
    if flashed.build_id is None:
        allure.attach("the image has no /etc/build-id: the boot was followed, but which build it is stays unproven",
                      name="build-id", attachment_type=allure.attachment_type.TEXT)
    else:
        assert record.build_id == flashed.build_id


def test_boot_milestones_in_order_and_in_time(booted: BootRecord, rig: Rig, flashed: FlashRecord) -> None:
    expected = [name for name, _ in boot_markers(rig, flashed.facts)]
    seen = [name for name in booted.markers if name in expected]
    assert seen == expected
    times = [booted.markers[name] for name in seen]
    assert times == sorted(times)
    for name in seen:
        assert booted.markers[name] <= rig.timeouts.get(name, rig.timeouts["login"])


def test_the_booted_system_is_the_flashed_image(booted: BootRecord, flashed: FlashRecord) -> None:
    """The run's token (written at flash time), the OS and the root partition identify what booted."""
    facts = flashed.facts
    allure.attach("\n".join(f"{k}: {v}" for k, v in booted.identity.items()) or "(nothing read)",
                  name="identity", attachment_type=allure.attachment_type.TEXT)
    if facts is None:
        pytest.skip("nothing is known about the flashed image's boot")
    if facts.token:
        assert booted.identity.get("token") == facts.token
    if facts.pretty_name:
        assert booted.identity.get("PRETTY_NAME") == facts.pretty_name
    if facts.root_partuuid and booted.identity.get("root", "").startswith("PARTUUID="):
        assert booted.identity["root"] == f"PARTUUID={facts.root_partuuid}"
