"""Cost of one transfer through pyusb -> libusb -> umockdev -> the Python transport -> a model, and how much
CPU a host burns while it waits on a device that does not answer.

Run: ``umockdev-wrapper .venv/bin/python bench/usb_transport.py [--count 300] [--wait 2]``. The host is a
child process with plain pyusb, as rpiboot or the flasher would be. Prints one row per transfer kind
(median and 90th percentile), then the CPU seconds of the host and of this (device) process during a
bulk IN that never completes and ends by libusb's timeout.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import textwrap
import threading

from hil.virtual.usb.descriptors import Descriptors, Endpoint, Interface, StandardRequests, config_descriptor
from hil.virtual.usb.device import ControlSetup, Unresponsive, UsbIdentity
from hil.virtual.usb.umockdev_bus import UsbBus

VID, PID = 0x1209, 0x0001


class Sink:
    """Accepts everything, answers vendor control IN with a fixed word, never answers bulk IN."""

    def __init__(self) -> None:
        device = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, VID, PID, 0x0100, 1, 2, 0, 1)
        config = config_descriptor((Interface(0, 0xFF, 0, 0, (Endpoint(0x01), Endpoint(0x81))),))
        descriptors = Descriptors(device, config, {1: "HIL", 2: "Sink"}, "high")
        self.identity: UsbIdentity = descriptors.identity()
        self._standard = StandardRequests(descriptors)

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        reply = self._standard.handle(setup, data)
        return reply if reply is not None else b"\xef\xbe\xad\xde"[: setup.wLength] if setup.is_in else b""

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        return len(data)

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        raise Unresponsive()


HOST = """
    import json, os, resource, statistics, sys, time, usb.core, usb.util
    count, wait = int(sys.argv[1]), float(sys.argv[2])
    dev = usb.core.find(idVendor={vid})
    usb.util.claim_interface(dev, 0)

    def timed(action, n):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
        times.sort()
        return [statistics.median(times), times[int(len(times) * 0.9)]]

    chunk, mib = os.urandom(64 * 1024), os.urandom(1024 * 1024)
    rows = {{
        "bulk OUT 64 KiB": timed(lambda: dev.write(0x01, chunk), count),
        "bulk OUT 1 MiB": timed(lambda: dev.write(0x01, mib), max(10, count // 10)),
        "ctrl IN 4 B (vendor)": timed(lambda: dev.ctrl_transfer(0xC0, 0, 4, 0, 4), count),
        "ctrl OUT 0 B (vendor)": timed(lambda: dev.ctrl_transfer(0x40, 0, 24, 0, None), count),
    }}
    print(json.dumps({{"rows": rows}}), flush=True)
    sys.stdin.readline()  # the device side starts its CPU clock
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    try:
        dev.read(0x81, 512, timeout=int(wait * 1000))
    except usb.core.USBTimeoutError:
        pass
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({{"wait": time.monotonic() - start, "cpu": cpu}}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="transfers per row")
    parser.add_argument("--wait", type=float, default=2.0, help="seconds the host waits on a silent bulk IN")
    args = parser.parse_args()

    bus = UsbBus.get()
    port = bus.port("1-1.4")
    port.attach(Sink())
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOST.format(vid=VID)), str(args.count),
                             str(args.wait)], env=bus.child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert host.stdin is not None and host.stdout is not None
        rows = json.loads(host.stdout.readline())["rows"]
        print(f"{'transfer':<24}{'median ms':>10}{'p90 ms':>10}{'MB/s':>10}")
        for name, (median, p90) in rows.items():
            size = {"bulk OUT 64 KiB": 64 * 1024, "bulk OUT 1 MiB": 1024 * 1024}.get(name, 0)
            rate = f"{size / median / 1e6:10.0f}" if size else f"{'':>10}"
            print(f"{name:<24}{median * 1e3:10.3f}{p90 * 1e3:10.3f}{rate}")
        before = resource.getrusage(resource.RUSAGE_SELF)
        host.stdin.write("go\n")
        host.stdin.flush()
        waited = json.loads(host.stdout.readline())
        after = resource.getrusage(resource.RUSAGE_SELF)
        device_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(f"\nsilent bulk IN, {waited['wait']:.2f} s wall until libusb's timeout:")
        print(f"  host process CPU   {waited['cpu'] * 1e3:8.1f} ms")
        print(f"  device process CPU {device_cpu * 1e3:8.1f} ms")
        host.wait(30)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        port.detach()
        bus.close()


if __name__ == "__main__":
    main()
