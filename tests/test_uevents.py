"""The process's one uevent monitor: waiters come and go while devices keep changing, and nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hil.hostenv import umockdev_active

pytestmark = pytest.mark.skipif(
    not umockdev_active(), reason="needs umockdev's preload library: run pytest under `umockdev-wrapper`")

# A child process of its own: its own umockdev testbed, where a thread plugs and unplugs a device on port 1-1
# as fast as it can while the main thread opens and closes 1500 short waits on that port. With a monitor per
# wait, umockdev 0.17.16 aborts such a process within a few hundred waits (a listener socket bound or closed
# while its sender connects to the listeners).
CHURN = textwrap.dedent("""
    import json, threading, time
    import gi
    gi.require_version("UMockdev", "1.0")
    from gi.repository import UMockdev
    from hil.usbboot.events import PortEvents

    testbed = UMockdev.Testbed.new()
    device = "/sys/devices/pci0000:00/usb1/1-1"
    stop = threading.Event()

    def plug_and_unplug():
        while not stop.is_set():
            testbed.add_from_string("P: /devices/pci0000:00/usb1/1-1\\nE: SUBSYSTEM=usb\\nE: DEVTYPE=usb_device\\n")
            testbed.uevent(device, "remove")
            testbed.remove_device(device)

    plugger = threading.Thread(target=plug_and_unplug)
    plugger.start()
    actions = []
    try:
        for _ in range(1500):
            with PortEvents("1-1", on_event=actions.append) as events:
                events.wait(lambda: None, time.monotonic() + 0.001)
    finally:
        stop.set()
        plugger.join()
    print(json.dumps({"add": actions.count("add"), "remove": actions.count("remove")}))
""")


def test_waiters_that_come_and_go_while_a_port_churns_hear_its_events() -> None:
    done = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["add"] > 0 and seen["remove"] > 0, seen
