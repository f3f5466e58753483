"""The host check that keeps umockdev 0.17.16 from aborting the run when a uevent listener falls behind."""

from __future__ import annotations

from pathlib import Path

from hil.virtual.usb.ueventqueue import UEVENT_QUEUE, uevent_queue_shortfall


def test_the_kernel_default_queue_is_reported_with_the_fix(tmp_path: Path) -> None:
    qlen = tmp_path / "max_dgram_qlen"
    qlen.write_text("10\n")
    message = uevent_queue_shortfall(str(qlen))
    assert message is not None
    assert "is 10" in message and f"sysctl -w net.unix.max_dgram_qlen={UEVENT_QUEUE}" in message


def test_a_queue_with_room_and_an_unreadable_setting_pass(tmp_path: Path) -> None:
    qlen = tmp_path / "max_dgram_qlen"
    qlen.write_text(f"{UEVENT_QUEUE}\n")
    assert uevent_queue_shortfall(str(qlen)) is None
    assert uevent_queue_shortfall(str(tmp_path / "absent")) is None


def test_setup_gave_this_host_room() -> None:
    """setup.sh raises the host's queue; without it the virtual rig aborts at random under load."""
    assert uevent_queue_shortfall() is None
