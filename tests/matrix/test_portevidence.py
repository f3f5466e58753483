"""Per-attempt host-bug evidence: the kernel log lines of one port since the attempt began, the usbmon text of its
bus, and how to enable what is missing. Files stand in for /dev/kmsg and debugfs here."""

from __future__ import annotations

from pathlib import Path

from hil.control.portevidence import PortEvidence, port_pattern

BEFORE = "6,100,1000,-;usb 1-1.3: USB disconnect, device number 4\n"
DURING = [
    "6,101,2000,-;usb 1-1.3: new full-speed USB device number 5 using xhci_hcd\n",
    " SUBSYSTEM=usb\n",
    "3,102,2100,-;usb 1-1-port3: Cannot enable. Maybe the USB cable is bad?\n",
    "6,103,2200,-;usb 1-1.3.1: new high-speed USB device number 6 using xhci_hcd\n",  # a device further down
    "6,104,2300,-;usb 1-1.30: new high-speed USB device number 7 using xhci_hcd\n",  # another port
    "6,105,2400,-;usb-storage 1-1.3:1.0: USB Mass Storage device detected\n",
    "4,106,2500,-;usb 1-1.3: config 1 interface 0 altsetting 0 endpoint 0x1 has invalid maxpacket 512, setting to 64\n",
]


def test_only_this_port_and_its_hub_port_since_the_attempt_began(tmp_path: Path) -> None:
    kmsg, usbmon = tmp_path / "kmsg", tmp_path / "usbmon"
    usbmon.mkdir()
    kmsg.write_text(BEFORE)
    (usbmon / "1u").write_text("ffff 1 S Co:1:004:0 s 40 00 0018 0000 0000 0\n")
    with PortEvidence("1-1.3", kmsg=kmsg, usbmon=usbmon) as evidence:
        with kmsg.open("a") as f:
            f.writelines(DURING)
        with (usbmon / "1u").open("a") as f:
            f.write("ffff 2 S Co:1:005:0 s 40 00 0018 0000 0000 0\nffff 3 C Co:1:005:0 -71 0\n")
    assert evidence.kernel_log == [
        "usb 1-1.3: new full-speed USB device number 5 using xhci_hcd",
        "usb 1-1-port3: Cannot enable. Maybe the USB cable is bad?",
        "usb-storage 1-1.3:1.0: USB Mass Storage device detected",
        "usb 1-1.3: config 1 interface 0 altsetting 0 endpoint 0x1 has invalid maxpacket 512, setting to 64"]
    assert evidence.usbmon_text == "ffff 2 S Co:1:005:0 s 40 00 0018 0000 0000 0\nffff 3 C Co:1:005:0 -71 0\n"
    facts = evidence.to_dict()
    assert facts["kernel_log_note"] == facts["usbmon_note"] == "" and facts["kernel"]


def test_missing_sources_say_how_to_enable_them(tmp_path: Path) -> None:
    with PortEvidence("3-2", kmsg=tmp_path / "no-kmsg", usbmon=tmp_path / "no-debugfs") as evidence:
        pass
    assert evidence.kernel_log == [] and evidence.usbmon_text is None
    assert "dmesg_restrict" in evidence.kernel_log_note
    assert "modprobe usbmon" in evidence.usbmon_note and str(tmp_path / "no-debugfs" / "3u") in evidence.usbmon_note


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("")
    (tmp_path / "kmsg").symlink_to(tmp_path / "real")
    with PortEvidence("3-2", kmsg=tmp_path / "kmsg", usbmon=tmp_path) as evidence:
        pass
    assert "kernel log unavailable" in evidence.kernel_log_note


def test_root_port_messages_name_the_root_hub() -> None:
    assert port_pattern("3-2").search("usb usb3-port2: over-current condition")
    assert not port_pattern("3-2").search("usb usb3-port21: over-current condition")
