"""Which host controller a USB port hangs off, and the speed each boot stage enumerated at.

A boot ROM can fail on some USB ports and not others, "likely specific to the host controller and driver"
(usbboot-protocol.md section 6), so every USB boot result worth keeping names the controller:
its driver (``xhci_hcd``, ``ehci-pci``, ``dwc2``, ...), its PCI ids or platform identity, the hubs between
it and the port, and the speed each boot stage enumerated at. All of it is read from sysfs through udev,
walking up from the port's bus (``usbN``) and hubs, so it works with nothing on the port.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyudev

from hil.errors import InfrastructureError
from hil.usbboot.trace import FileServed, Listener, StageTiming
from hil.usbport import UsbPort

#: sysfs ``speed`` (Mb/s) -> the USB speed's name.
SPEED_NAMES = {"1.5": "low", "12": "full", "480": "high", "5000": "super", "10000": "super+", "20000": "super+"}
#: Stages of the USB boot host that end when a device has enumerated on the port.
ENUMERATION_STAGES = ("rom", "second_stage", "mass_storage")
STAGE = "hostctl"


@dataclass(frozen=True)
class Hub:
    """A hub on the way from the controller to the port; the root hub first."""

    name: str  # sysfs name: "usb1", "1-1", "1-1.2"
    id: str  # "1d6b:0002"
    product: str
    speed: str  # "high", "super", ...
    ports: int


@dataclass(frozen=True)
class HostController:
    port: str
    driver: str  # xhci_hcd, ehci-pci, dwc2, ...
    subsystem: str  # pci, platform, ...
    address: str  # PCI slot (0000:00:14.0) or platform device name (fe980000.usb)
    ids: str  # PCI vendor:device ("8086:a36d"), or the device-tree "compatible" of a platform controller
    hubs: tuple[Hub, ...]

    @property
    def label(self) -> str:
        """One line that tells controllers apart in a table: driver, identity, where it sits."""
        return f"{self.driver} {self.ids} ({self.address})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}

    def describe(self) -> str:
        chain = " -> ".join(f"{h.name} [{h.id} {h.product}, {h.speed}, {h.ports} ports]" for h in self.hubs)
        return (f"port {self.port}: {self.subsystem} controller {self.address}, driver {self.driver}, "
                f"ids {self.ids}\n  hubs: {chain} -> port {self.port}\n")


def _attr(device: pyudev.Device, name: str) -> str:
    try:
        value = device.attributes.asstring(name)
    except (KeyError, UnicodeDecodeError):
        return ""
    return value.strip()


def _usb_device(context: pyudev.Context, name: str) -> pyudev.Device | None:
    try:
        return pyudev.Devices.from_name(context, "usb", name)
    except pyudev.DeviceNotFoundError:
        return None


def speed_name(mbps: str) -> str:
    return SPEED_NAMES.get(mbps.strip(), f"{mbps.strip()} Mb/s" if mbps.strip() else "unknown")


def identify(port: str, context: pyudev.Context | None = None) -> HostController:
    """The host controller of ``port`` ("1-1.3") and the hubs on the way, from sysfs."""
    path = UsbPort(port)
    context = context or pyudev.Context()
    names = [f"usb{path.bus}"] + [f"{path.bus}-{'.'.join(map(str, path.ports[:n]))}"
                                  for n in range(1, len(path.ports))]
    hubs: list[Hub] = []
    root: pyudev.Device | None = None
    for name in names:
        device = _usb_device(context, name)
        if device is None:
            what = f"USB bus {path.bus}" if name.startswith("usb") else f"hub {name}"
            raise InfrastructureError(f"{what} of port {path} does not exist on this host. Fix: check the port "
                                      "path against `lsusb -t` and that the hub is plugged in and powered",
                                      stage=STAGE, port=str(path))
        if root is None:
            root = device
        hubs.append(Hub(name, f"{_attr(device, 'idVendor')}:{_attr(device, 'idProduct')}",
                        _attr(device, "product"), speed_name(_attr(device, "speed")),
                        int(_attr(device, "maxchild") or 0)))
    assert root is not None
    controller = root.parent
    if controller is None:
        raise InfrastructureError(f"USB bus {path.bus} has no parent device in sysfs, so its controller is "
                                  "unknown. Fix: check that /sys is mounted", stage=STAGE, port=str(path))
    if controller.subsystem == "pci":
        vendor, device_id = (_attr(controller, key).removeprefix("0x") for key in ("vendor", "device"))
        ids = f"{vendor}:{device_id}"
    else:
        ids = controller.properties.get("OF_COMPATIBLE_0") or controller.properties.get("MODALIAS", "?")
    return HostController(str(path), controller.driver or "(no driver)", controller.subsystem or "?",
                          controller.sys_name, ids, tuple(hubs))


def port_speed(port: str, context: pyudev.Context | None = None) -> str | None:
    """The speed the device now on ``port`` enumerated at ("full", "high", ...), or None if the port is empty."""
    device = _usb_device(context or pyudev.Context(), str(port))
    return speed_name(_attr(device, "speed")) if device is not None else None


class SpeedRecorder(Listener):
    """Notes the speed each boot stage enumerated at, as the USB boot host finds the device; passes every
    event on to ``inner`` (a progress display or the report's steps)."""

    def __init__(self, port: str, inner: Listener | None = None, context: pyudev.Context | None = None):
        self.port = str(port)
        self.inner = inner or Listener()
        self.context = context or pyudev.Context()
        self.speeds: dict[str, str] = {}

    def stage_started(self, stage: StageTiming) -> None:
        self.inner.stage_started(stage)

    def stage_ended(self, stage: StageTiming) -> None:
        if stage.ok and stage.name in ENUMERATION_STAGES:
            speed = port_speed(self.port, self.context)
            if speed is not None:
                self.speeds.setdefault(stage.name, speed)
        self.inner.stage_ended(stage)

    def file_served(self, served: FileServed) -> None:
        self.inner.file_served(served)
