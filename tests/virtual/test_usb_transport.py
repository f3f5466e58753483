"""The umockdev USB transport, seen from a host process using plain pyusb (real libusb) and pyudev."""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hil.errors import InputError
from hil.hostenv import outside_umockdev, umockdev_active
from hil.virtual.journal import Journal
from hil.virtual.usb.descriptors import Descriptors, Endpoint, Interface, StandardRequests, config_descriptor
from hil.virtual.usb.device import BlockChild, Cancelled, ControlSetup, DeviceGone, Stall, Unresponsive, UsbIdentity
from hil.virtual.usb.umockdev_bus import UsbBus, UsbPort

pytestmark = pytest.mark.skipif(
    not umockdev_active(), reason="needs umockdev's preload library: run pytest under `umockdev-wrapper`")

VID, PID = 0x1209, 0x0001
STRINGS = {1: "HIL", 2: "Echo", 3: "SER-42"}


def identity(speed: str = "high", pid: int = PID, *, storage: bool = False,
             disks: tuple[BlockChild, ...] = ()) -> Descriptors:
    device = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, VID, pid, 0x0100, 1, 2, 3, 1)
    cls = (0x08, 0x06, 0x50) if storage else (0xFF, 0, 0)
    config = config_descriptor((Interface(0, *cls, (Endpoint(0x01), Endpoint(0x81))),))
    return Descriptors(device, config, STRINGS, speed)


class Echo:
    """A test device: vendor request 1 stores/returns a buffer, bulk OUT stores, bulk IN echoes it.
    Vendor request 2 stalls, 3 reports the device gone; bulk IN with nothing stored never answers;
    ``hold`` makes bulk IN block until cancelled, ``gate`` until the test opens it."""

    def __init__(self, descriptors: Descriptors | None = None, disks: tuple[BlockChild, ...] = ()):
        descriptors = descriptors or identity()
        self.identity: UsbIdentity = descriptors.identity(disks)
        self._standard = StandardRequests(descriptors)
        self.stored = b""
        self.requests: list[ControlSetup] = []
        self.hold = False
        self.gate: threading.Event | None = None  # bulk IN waits for it before answering
        self.waiting = threading.Event()  # a bulk IN is blocked in the model
        self.cancelled = threading.Event()  # ... and the transport cancelled it

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        self.requests.append(setup)
        reply = self._standard.handle(setup, data)
        if reply is not None:
            return reply
        if setup.is_vendor and setup.bRequest == 1:
            if setup.is_in:
                return self.stored[: setup.wLength]
            self.stored = data + setup.wValue.to_bytes(2, "little")
            return b""
        if setup.is_vendor and setup.bRequest == 3:
            raise DeviceGone()
        raise Stall("unknown request")

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        self.stored = data
        return len(data)

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        if self.hold:
            self.waiting.set()
            cancel.wait()
            self.cancelled.set()
            raise Cancelled()
        if not self.stored:
            self.waiting.set()
            raise Unresponsive()
        if self.gate is not None:
            self.waiting.set()
            self.gate.wait()
        return self.stored[:length]


@pytest.fixture(scope="module")
def bus() -> UsbBus:
    """The process's bus: it lives as long as the process (libusb here is bound to its testbed)."""
    return UsbBus.get()


@pytest.fixture
def port(bus: UsbBus) -> Iterator[UsbPort]:
    port = bus.port("1-1.4")
    yield port
    port.detach()


class Child:
    """A host process: plain Python with pyusb/pyudev in the testbed's environment, talking JSON lines."""

    def __init__(self, bus: UsbBus, *code: str):
        self.proc = subprocess.Popen([sys.executable, "-c", script(code)], env=bus.child_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._pending = b""

    def expect(self, want: Callable[[dict[str, Any]], bool] = lambda _: True, limit: float = 20) -> dict[str, Any]:
        """The next line the host prints that ``want`` accepts."""
        assert self.proc.stdout is not None
        while True:
            line, newline, rest = self._pending.partition(b"\n")
            if newline:
                self._pending = rest
                message = json.loads(line)
                if want(message):
                    return message
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536) if self._selector.select(limit) else b""
            if not chunk:
                self.proc.kill()
                _, err = self.proc.communicate()
                raise AssertionError(f"host process ended or went silent; stderr:\n{err.decode()}")
            self._pending += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        self._selector.close()


def script(parts: tuple[str, ...]) -> str:
    return "\n".join(textwrap.dedent(part) for part in parts)


def run_host(bus: UsbBus, *code: str) -> dict[str, Any]:
    """Run a pyusb host to completion; it prints one JSON object."""
    done = subprocess.run([sys.executable, "-c", script(code)], env=bus.child_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


FIND = f"""
    import json, os, sys, usb.core, usb.util
    dev = usb.core.find(idVendor={VID})
    out = lambda **kw: print(json.dumps(kw), flush=True)
"""


def test_pyusb_finds_device_with_bus_port_path_speed_and_strings(bus: UsbBus, port: UsbPort) -> None:
    port.attach(Echo())
    got = run_host(bus, FIND, """
        out(bus=dev.bus, address=dev.address, ports=list(dev.port_numbers), speed=dev.speed,
            strings=[dev.manufacturer, dev.product, dev.serial_number])
    """)
    assert port.devname is not None
    assert got == {"bus": 1, "address": int(port.devname.rsplit("/", 1)[1]), "ports": [1, 4], "speed": 3,
                   "strings": ["HIL", "Echo", "SER-42"]}


def test_every_attach_gets_a_new_device_number(bus: UsbBus, port: UsbPort) -> None:
    port.attach(Echo())
    first = port.devname
    port.detach()
    port.attach(Echo(identity("full")))
    got = run_host(bus, FIND, "out(address=dev.address, speed=dev.speed)")
    assert port.devname != first
    assert got == {"address": int(str(port.devname).rsplit("/", 1)[1]), "speed": 2}


def test_control_and_bulk_transfers_arrive_intact(bus: UsbBus, port: UsbPort) -> None:
    echo = Echo()
    port.attach(echo)
    got = run_host(bus, FIND, """
        import hashlib, os
        dev.ctrl_transfer(0x40, 1, 0x1234, 0, b"hello")
        ctrl_in = bytes(dev.ctrl_transfer(0xC0, 1, 0, 0, 64)).hex()
        small, big = os.urandom(1024), os.urandom(2 * 1024 * 1024)
        sent_small = dev.write(0x01, small)
        back_small = bytes(dev.read(0x81, 4096)) == small
        sent_big = dev.write(0x01, big)
        out(ctrl_in=ctrl_in, sent=[sent_small, sent_big], back_small=back_small,
            big=hashlib.sha256(big).hexdigest())
    """)
    assert got["ctrl_in"] == (b"hello" + (0x1234).to_bytes(2, "little")).hex()
    assert got["sent"] == [1024, 2 * 1024 * 1024]
    assert got["back_small"]
    assert got["big"] == hashlib.sha256(echo.stored).hexdigest()


def test_unresponsive_transfer_times_out_and_the_device_stays_usable(bus: UsbBus, port: UsbPort) -> None:
    port.attach(Echo())
    got = run_host(bus, FIND, f"""
        import select
        usb.util.claim_interface(dev, 0)
        node = os.open("{port.devname}", os.O_RDWR)
        try:
            dev.read(0x81, 512, timeout=300)
            outcome = "data"
        except usb.core.USBTimeoutError:
            outcome = "timeout"
        poller = select.poll()
        poller.register(node, select.POLLOUT)
        idle_wakeups = poller.poll(0)  # libusb sleeps on this: nothing to reap, so not writable
        dev.write(0x01, b"again")
        out(outcome=outcome, idle_wakeups=len(idle_wakeups), after=bytes(dev.read(0x81, 512)).decode())
    """)
    assert got == {"outcome": "timeout", "idle_wakeups": 0, "after": "again"}


def test_stall_and_device_gone_map_to_libusb_errors(bus: UsbBus, port: UsbPort) -> None:
    port.attach(Echo())
    got = run_host(bus, FIND, """
        def code(request):
            try:
                dev.ctrl_transfer(0xC0, request, 0, 0, 4)
                return 0
            except usb.core.USBError as e:
                return e.backend_error_code
        out(codes=[code(2), code(3)], still=bytes(dev.ctrl_transfer(0xC0, 1, 0, 0, 4)).hex())
    """)
    assert got == {"codes": [-9, -4], "still": ""}  # LIBUSB_ERROR_PIPE, NO_DEVICE; then EP0 works again


def test_host_management_requests_reach_the_model_and_the_journal(bus: UsbBus) -> None:
    journal = Journal()
    port = bus.port("1-1.3", journal=journal)
    echo = Echo()
    port.attach(echo)
    try:
        got = run_host(bus, FIND, """
            dev.set_configuration(1)
            dev.set_interface_altsetting(0, 0)
            dev.clear_halt(0x81)
            dev.reset()
            out(done=True)
        """)
    finally:
        port.detach()
    assert got == {"done": True}
    assert [(r.bmRequestType, r.bRequest, r.wValue, r.wIndex) for r in echo.requests if r.bRequest in (1, 9, 11)] == [
        (0x00, 9, 1, 0), (0x01, 11, 0, 0), (0x02, 1, 0, 0x81)]
    assert [e.what for e in journal.events("usb")] == [
        "attach", "set_configuration", "set_interface", "clear_halt", "reset", "detach"]


def test_detach_mid_transfer_ends_it_as_no_device(bus: UsbBus, port: UsbPort) -> None:
    echo = Echo()
    echo.hold = True
    port.attach(echo)
    host = Child(bus, FIND, """
        out(ready=True)
        def code(call):
            try:
                call()
                return 0
            except usb.core.USBError as e:
                return e.backend_error_code
        during = code(lambda: dev.read(0x81, 512, timeout=20000))
        after = code(lambda: dev.write(0x01, b"x"))
        out(during=during, after=after)
    """)
    try:
        host.expect()
        assert echo.waiting.wait(20)
        port.detach()
        assert host.expect() == {"during": -4, "after": -4}  # LIBUSB_ERROR_NO_DEVICE
        assert echo.cancelled.is_set()
    finally:
        host.close()


MONITOR = """
    import json, sys, pyudev
    ctx = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(ctx)
    for subsystem in ("usb", "block", "scsi"):
        monitor.filter_by(subsystem)
    monitor.start()
    print(json.dumps({"ready": True}), flush=True)
    for dev in iter(lambda: monitor.poll(timeout=20), None):
        message = {"action": dev.action, "name": dev.sys_name, "type": dev.device_type,
                   "props": dict(dev.properties)}
        if dev.action == "add":
            chain, parent = [], dev.parent
            while parent is not None:
                chain.append([parent.sys_name, parent.driver])
                parent = parent.parent
            message["chain"] = chain
            message["attrs"] = {a: dev.attributes.asstring(a) for a in ("devpath", "busnum", "size", "ro")
                                if a in dev.attributes.available_attributes}
            if dev.device_node and dev.subsystem == "block":
                with open(dev.device_node, "rb") as disk:
                    message["head"] = disk.read(16).hex()
        print(json.dumps(message), flush=True)
"""


def test_pyudev_sees_add_and_remove_with_the_parent_chain(bus: UsbBus, port: UsbPort) -> None:
    monitor = Child(bus, MONITOR)
    try:
        monitor.expect()
        port.attach(Echo())
        devname = port.devname
        added = monitor.expect(lambda m: m["type"] == "usb_device" and m["name"] == "1-1.4")
        interface = monitor.expect(lambda m: m["type"] == "usb_interface")
        port.detach()
        removed = monitor.expect(lambda m: m["action"] == "remove" and m["type"] == "usb_device")
    finally:
        monitor.close()
    assert added["action"] == "add" and added["attrs"] == {"devpath": "1.4", "busnum": "1"}
    assert added["props"]["ID_VENDOR_ID"] == f"{VID:04x}" and added["props"]["ID_SERIAL_SHORT"] == "SER-42"
    assert added["props"]["DEVNAME"] == devname
    assert added["chain"] == [["1-1", "usb"], ["usb1", "usb"], ["0000:00:14.0", "xhci_hcd"]]
    assert interface["name"] == "1-1.4:1.0" and interface["props"]["INTERFACE"] == "255/0/0"
    assert removed["name"] == "1-1.4"


def test_disk_child_is_a_block_device_reaching_its_target(bus: UsbBus, port: UsbPort, tmp_path: Any) -> None:
    backing = tmp_path / "medium.img"
    backing.write_bytes(b"BOOTSECTOR-DATA!" + bytes(1024 * 1024 - 16))
    disk = BlockChild(str(backing), 1024 * 1024, "RPi-MSD-", "mmcblk0")
    monitor = Child(bus, MONITOR)
    try:
        monitor.expect()
        port.attach(Echo(identity(storage=True), (disk,)))
        added = monitor.expect(lambda m: m["type"] == "disk")
        (name,) = port.disks
        port.update_disks((BlockChild(str(backing), 2 * 1024 * 1024, "RPi-MSD-", "mmcblk0"),))
        changed = monitor.expect(lambda m: m["type"] == "disk")
        port.update_disks(())
        removed = monitor.expect(lambda m: m["type"] == "disk")
        port.detach()
        host_removed = monitor.expect(lambda m: m["type"] == "scsi_host")
        device_removed = monitor.expect(lambda m: m["type"] == "usb_device")
    finally:
        monitor.close()
    assert added["action"] == "add" and added["name"] == name.removeprefix("/dev/")
    assert added["props"]["DEVNAME"] == name and added["props"]["ID_BUS"] == "usb"
    assert added["props"]["ID_PATH"] == "pci-0000:00:14.0-usb-0:1.4:1.0-scsi-0:0:0:0"
    assert added["attrs"] == {"size": "2048", "ro": "0"}
    assert added["head"] == b"BOOTSECTOR-DATA!".hex()
    host = added["chain"][0][0].split(":")[0]
    assert added["chain"][:5] == [[f"{host}:0:0:0", "sd"], [f"target{host}:0:0", None], [f"host{host}", None],
                                  ["1-1.4:1.0", "usb-storage"], ["1-1.4", "usb"]]
    assert changed["action"] == "change"
    assert removed["action"] == "remove" and not port.disks
    assert not os.path.lexists(os.path.join(bus.root_dir, name.lstrip("/")))
    assert host_removed["action"] == device_removed["action"] == "remove"


def test_two_ports_on_different_buses_and_controllers(bus: UsbBus, port: UsbPort) -> None:
    other = bus.port("2-3", controller="ehci")
    try:
        port.attach(Echo())
        other.attach(Echo(identity("super", pid=0x0002)))
        got = run_host(bus, f"""
            import json, pyudev, usb.core
            ctx = pyudev.Context()
            found = []
            for dev in sorted(usb.core.find(find_all=True, idVendor={VID}), key=lambda d: d.bus):
                name = str(dev.bus) + "-" + ".".join(map(str, dev.port_numbers))
                udev = pyudev.Devices.from_name(ctx, "usb", name)
                controller = udev.find_parent("pci")
                found.append([dev.bus, list(dev.port_numbers), dev.speed, controller.driver,
                              bytes(dev.ctrl_transfer(0xC0, 1, 0, 0, 4)).hex()])
            print(json.dumps(found))
        """)
    finally:
        other.detach()
    # the ehci bus caps the super-speed device at high speed
    assert got == [[1, [1, 4], 3, "xhci_hcd", ""], [2, [3], 3, "ehci-pci", ""]]


def test_bad_port_paths_and_controller_clashes_are_input_errors(bus: UsbBus) -> None:
    for path in ("1.4", "0-1", "1-16", "1-1.8"):
        with pytest.raises(InputError):
            bus.port(path)
    with pytest.raises(InputError):
        bus.port("1-2", controller="ohci")
    bus.port("3-1", controller="ehci")
    with pytest.raises(InputError, match="ehci"):
        bus.port("3-2", controller="xhci")


def test_blocking_reapurb_waits_for_the_completion(bus: UsbBus, port: UsbPort) -> None:
    """A host that speaks usbfs without libusb: SUBMITURB of a bulk IN, then the blocking REAPURB."""
    echo = Echo()
    echo.stored, echo.gate = b"late data", threading.Event()
    port.attach(echo)
    host = Child(bus, f"""
        import ctypes, json, os, struct
        ioctl = ctypes.CDLL(None, use_errno=True).ioctl  # fcntl.ioctl would pass a copy of small buffers
        ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        buffer = ctypes.create_string_buffer(64)
        urb = ctypes.create_string_buffer(56)
        struct.pack_into("<BBxxiIxxxxQi", urb, 0, 3, 0x81, 0, 0, ctypes.addressof(buffer), 64)
        reaped = ctypes.c_void_p()
        fd = os.open("{port.devname}", os.O_RDWR)
        assert ioctl(fd, 0x8038550A, ctypes.addressof(urb)) == 0  # SUBMITURB
        print(json.dumps(dict(submitted=True)), flush=True)
        assert ioctl(fd, 0x4008550C, ctypes.addressof(reaped)) == 0  # REAPURB
        status, actual = struct.unpack_from("<i", urb, 4)[0], struct.unpack_from("<i", urb, 28)[0]
        print(json.dumps(dict(same=reaped.value == ctypes.addressof(urb), status=status,
                              data=buffer.raw[:actual].decode())))
    """)
    try:
        host.expect()
        assert echo.waiting.wait(20)
        echo.gate.set()
        assert host.expect() == {"same": True, "status": 0, "data": "late data"}
    finally:
        host.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop device")
def test_block_device_target_shows_as_a_block_device_with_its_ioctls(bus: UsbBus, port: UsbPort,
                                                                      tmp_path: Any) -> None:
    image = tmp_path / "emmc.img"
    image.write_bytes(b"LOOPDATA" + bytes(4 * 1024 * 1024 - 8))
    tool_env = outside_umockdev()
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], env=tool_env, capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        port.attach(Echo(identity(storage=True), (BlockChild(loop, 4 * 1024 * 1024, "RPi-MSD-", "emmc"),)))
        (name,) = port.disks
        got = run_host(bus, f"""
            import fcntl, json, os, stat, struct, pyudev
            fd = os.open("{name}", os.O_RDONLY)
            size = struct.unpack("Q", fcntl.ioctl(fd, 0x80081272, bytes(8)))[0]  # BLKGETSIZE64
            udev = pyudev.Devices.from_device_file(pyudev.Context(), "{name}")
            print(json.dumps(dict(block=stat.S_ISBLK(os.fstat(fd).st_mode) and stat.S_ISBLK(os.stat("{name}").st_mode),
                                  size=size, head=os.read(fd, 8).decode(),
                                  usb=udev.find_parent("usb", "usb_device").sys_name)))
        """)
        port.detach()
    finally:
        subprocess.run(["losetup", "-d", loop], env=tool_env, check=False)
    assert got == {"block": True, "size": 4 * 1024 * 1024, "head": "LOOPDATA", "usb": "1-1.4"}


CLOSE = """
    import json, os
    from hil.errors import InfrastructureError
    from hil.virtual.usb.umockdev_bus import UsbBus
    bus = UsbBus.get()
    root = bus.root_dir
    bus.close()
    try:
        UsbBus.get()
        again = None
    except InfrastructureError as e:
        again = str(e)
    print(json.dumps({"root_left": os.path.exists(root), "again": again}))
"""


def test_closing_the_bus_removes_its_testbed_and_no_second_one_follows() -> None:
    """libusb and the uevent monitor of a process stay bound to its first testbed: a second one would be a bus
    nobody sees, so asking for one is an error that says to start a new process."""
    done = subprocess.run([sys.executable, "-c", script((CLOSE,))], capture_output=True, text=True, timeout=60,
                          check=False)  # a process of its own, with a testbed of its own
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["root_left"] is False
    assert "was closed" in result["again"] and "new process" in result["again"]


def test_closing_a_handle_releases_its_claims_as_usbfs_does(bus: UsbBus, port: UsbPort) -> None:
    """rpiboot's retry closes its handle without releasing the interface, then opens and claims again; Linux
    usbfs releases a file's claims when it is closed, so that claim succeeds. While the first handle is open,
    a second one's claim is still refused (BUSY). The calls are pyusb's libusb1 backend, i.e. plain
    libusb_open / libusb_claim_interface / libusb_close."""
    port.attach(Echo())
    got = run_host(bus, FIND, """
        be = dev._ctx.backend
        def claim(handle):
            try:
                be.claim_interface(handle, 0)
                return "claimed"
            except usb.core.USBError as e:
                return e.backend_error_code
        first = be.open_device(dev._ctx.dev)
        held = claim(first)
        second = be.open_device(dev._ctx.dev)
        while_open = claim(second)
        be.close_device(second)
        after = []
        for _ in range(2):
            be.close_device(first)  # libusb_close, no libusb_release_interface
            first = be.open_device(dev._ctx.dev)
            after.append(claim(first))
        from array import array
        be.bulk_write(first, 0x01, 0, array("B", b"still works"), 1000)
        buffer = array("B", bytes(64))
        n = be.bulk_read(first, 0x81, 0, buffer, 1000)
        out(held=held, while_open=while_open, after=after, echo=buffer[:n].tobytes().decode())
    """)
    assert got == {"held": "claimed", "while_open": -6, "after": ["claimed", "claimed"], "echo": "still works"}
