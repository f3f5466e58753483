"""What Linux shows in sysfs and udev for a USB tree, written as umockdev device records.

The records follow what a real host has (kernel attributes plus the udev properties that udevd's
``usb_id``/``path_id`` builtins add), so that code finding devices through pyudev or libusb (which reads
``descriptors``, ``bConfigurationValue``, ``speed`` and ``DEVNAME``) sees the same shape as on hardware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hil.virtual.usb import usbfs

CONFIGURATION, INTERFACE, ENDPOINT = 2, 4, 5
USB_MAJOR, SCSI_DISK_MAJOR = 189, 8
SPEEDS = ("low", "full", "high", "super")  # slowest first
SPEED_ATTR = {"low": "1.5", "full": "12", "high": "480", "super": "5000"}


@dataclass(frozen=True)
class HostController:
    """One kind of PCI USB host controller; how it treats illegal descriptors is a host profile
    (:mod:`hil.virtual.usb.hostprofiles`), chosen per bus."""

    kind: str
    driver: str  # the PCI driver bound to it
    pci_slot: int  # first device number on pci0000:00 for controllers of this kind (bus 1 is function 0)
    vendor: int
    device: int
    pci_class: int
    product: str  # the root hub's product string
    root_ports: int
    max_speed: str  # the fastest a device enumerates at behind it
    usbfs_caps: int  # USBDEVFS_GET_CAPABILITIES answer (decides how libusb splits bulk transfers)


_SG_CAPS = (usbfs.CAP_ZERO_PACKET | usbfs.CAP_BULK_CONTINUATION | usbfs.CAP_NO_PACKET_SIZE_LIM
            | usbfs.CAP_BULK_SCATTER_GATHER | usbfs.CAP_REAP_AFTER_DISCONNECT)

CONTROLLERS = {
    "xhci": HostController("xhci", "xhci_hcd", 0x14, 0x8086, 0xA36D, 0x0C0330, "xHCI Host Controller", 15,
                           "super", _SG_CAPS),
    "ehci": HostController("ehci", "ehci-pci", 0x1D, 0x8086, 0x1E26, 0x0C0320, "EHCI Host Controller", 8,
                           "high", _SG_CAPS),
}

HUB_PORTS = 7  # ports of an intermediate hub


@dataclass(frozen=True)
class InterfaceInfo:
    number: int
    alternates: tuple[int, ...]
    cls: int
    subclass: int
    protocol: int
    endpoints: tuple[int, ...]  # addresses, alternate setting 0


@dataclass(frozen=True)
class ConfigInfo:
    value: int
    interfaces: tuple[InterfaceInfo, ...]


def parse_config(config: bytes) -> ConfigInfo:
    """The interfaces (with their alternate settings) and endpoints of one configuration descriptor."""
    value = config[5] if len(config) >= 9 and config[1] == CONFIGURATION else 1
    classes: dict[int, tuple[int, int, int]] = {}
    alternates: dict[int, list[int]] = {}
    endpoints: dict[int, list[int]] = {}
    current: tuple[int, int] | None = None  # (interface, alternate) the next endpoints belong to
    i = 0
    while i + 2 <= len(config) and config[i] >= 2:
        length, kind = config[i], config[i + 1]
        if kind == INTERFACE and i + 8 <= len(config):
            current = (config[i + 2], config[i + 3])
            classes.setdefault(current[0], (config[i + 5], config[i + 6], config[i + 7]))
            alternates.setdefault(current[0], []).append(current[1])
            endpoints.setdefault(current[0], [])
        elif kind == ENDPOINT and current is not None and current[1] == 0 and i + 3 <= len(config):
            endpoints[current[0]].append(config[i + 2])
        i += length
    return ConfigInfo(value, tuple(InterfaceInfo(n, tuple(alternates[n]), *classes[n], tuple(endpoints[n]))
                                   for n in classes))


def effective_speed(device_speed: str, controller: HostController) -> str:
    return min(device_speed, controller.max_speed, key=SPEEDS.index)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _ident(text: str) -> str:
    """udev's ID_* string sanitising: whitespace to underscores, drop anything unsafe."""
    return re.sub(r"[^0-9A-Za-z#+\-.:=@_]", "", re.sub(r"\s+", "_", text.strip()))


def _encoded(text: str) -> str:
    """udev's ID_*_ENC: the string as the device gave it, with anything but a safe character as ``\\xHH``."""
    return "".join(c if c.isalnum() or c in "#+-.:=@_" else "".join(f"\\x{b:02x}" for b in c.encode())
                   for c in text)


@dataclass
class Record:
    """One sysfs device: its path under /sys and what the add_from_string format carries."""

    syspath: str  # /sys/devices/...
    properties: dict[str, str]
    attributes: dict[str, str]
    binary: dict[str, bytes]
    links: dict[str, str]

    def text(self) -> str:
        lines = [f"P: {self.syspath.removeprefix('/sys')}"]
        lines += [f"E: {k}={v}" for k, v in self.properties.items()]
        lines += [f"A: {k}={_escape(v)}" for k, v in self.attributes.items()]
        lines += [f"H: {k}={v.hex().upper()}" for k, v in self.binary.items()]
        lines += [f"L: {k}={v}" for k, v in self.links.items()]
        return "\n".join(lines) + "\n"


def relative_link(from_syspath: str, to_syspath: str) -> str:
    """A symlink target inside sysfs, relative as the kernel writes them (so it resolves in the testbed)."""
    depth = from_syspath.strip("/").count("/")  # the link lives inside from_syspath
    return "../" * depth + to_syspath.removeprefix("/sys/")


def controller_record(syspath: str, c: HostController) -> Record:
    return Record(
        syspath,
        {"SUBSYSTEM": "pci", "DRIVER": c.driver, "PCI_CLASS": f"{c.pci_class:X}",
         "PCI_ID": f"{c.vendor:04X}:{c.device:04X}", "PCI_SLOT_NAME": syspath.rsplit("/", 1)[1],
         "MODALIAS": f"pci:v{c.vendor:08X}d{c.device:08X}sv00000000sd00000000bc0Csc03i{c.pci_class & 0xFF:02X}",
         },
        {"vendor": f"0x{c.vendor:04x}\n", "device": f"0x{c.device:04x}\n", "class": f"0x{c.pci_class:06x}\n"},
        {},
        {"driver": relative_link(syspath, f"/sys/bus/pci/drivers/{c.driver}")},
    )


@dataclass(frozen=True)
class UsbNode:
    """Where a usb_device sits: what sysfs and udev derive from its place in the tree."""

    syspath: str
    name: str  # "1-1.4" or "usb1"
    busnum: int
    devnum: int
    devpath: str  # "1.4", "0" for a root hub
    pci_name: str  # "0000:00:14.0"
    speed: str  # "full" / "high" / "super"

    @property
    def devname(self) -> str:
        return f"/dev/bus/usb/{self.busnum:03d}/{self.devnum:03d}"

    @property
    def id_path(self) -> str:
        usb = "" if self.devpath == "0" else f"-usb-0:{self.devpath}"
        return f"pci-{self.pci_name}{usb}"


def _string(strings: dict[int, str], index: int) -> str | None:
    return strings.get(index) if index else None


def device_records(node: UsbNode, device_descriptor: bytes, configs: tuple[bytes, ...],
                   strings: dict[int, str], interface_drivers: dict[int, str], maxchild: int = 0) -> list[Record]:
    """The usb_device and its usb_interface children, as the kernel plus udev's usb_id show them."""
    d = device_descriptor
    vid, pid, bcd = (int.from_bytes(d[o:o + 2], "little") for o in (8, 10, 12))
    manufacturer, product, serial = (_string(strings, d[o]) for o in (14, 15, 16))
    config = parse_config(configs[0])
    dclass = f"{d[4]}/{d[5]}/{d[6]}"
    ifaces = ":" + "".join(f"{i.cls:02x}{i.subclass:02x}{i.protocol:02x}:" for i in config.interfaces)
    vendor = _ident(manufacturer) if manufacturer else f"{vid:04x}"
    model = _ident(product) if product else f"{pid:04x}"
    props = {
        "SUBSYSTEM": "usb", "DEVTYPE": "usb_device", "DRIVER": "usb",
        "PRODUCT": f"{vid:x}/{pid:x}/{bcd:x}", "TYPE": dclass,
        "BUSNUM": f"{node.busnum:03d}", "DEVNUM": f"{node.devnum:03d}",
        "MAJOR": str(USB_MAJOR), "MINOR": str((node.busnum - 1) * 128 + node.devnum - 1),
        "DEVNAME": node.devname,
        "ID_BUS": "usb", "ID_VENDOR": vendor, "ID_VENDOR_ID": f"{vid:04x}", "ID_MODEL": model,
        "ID_MODEL_ID": f"{pid:04x}", "ID_REVISION": f"{bcd:04x}",
        "ID_SERIAL": "_".join(filter(None, (vendor, model, _ident(serial) if serial else None))),
        "ID_USB_INTERFACES": ifaces, "ID_PATH": node.id_path, "ID_PATH_TAG": _ident_tag(node.id_path),
    }
    if serial:
        props["ID_SERIAL_SHORT"] = _ident(serial)
    props["ID_VENDOR_ENC"] = _encoded(manufacturer) if manufacturer else f"{vid:04x}"
    props["ID_MODEL_ENC"] = _encoded(product) if product else f"{pid:04x}"
    # systemd 252's usb_id sets each of these twice (Debian 12's udev, as the kernel transport shows)
    for key in ("VENDOR", "VENDOR_ENC", "VENDOR_ID", "MODEL", "MODEL_ENC", "MODEL_ID", "REVISION", "SERIAL",
                "SERIAL_SHORT"):
        if f"ID_{key}" in props:
            props[f"ID_USB_{key}"] = props[f"ID_{key}"]
    attrs = {
        "idVendor": f"{vid:04x}", "idProduct": f"{pid:04x}", "bcdDevice": f"{bcd:04x}",
        "bDeviceClass": f"{d[4]:02x}", "bDeviceSubClass": f"{d[5]:02x}", "bDeviceProtocol": f"{d[6]:02x}",
        "bMaxPacketSize0": str(d[7]), "bNumConfigurations": str(d[17]), "version": f"{d[3]:x}.{d[2]:02x}",
        "speed": SPEED_ATTR[node.speed], "busnum": str(node.busnum), "devnum": str(node.devnum),
        "devpath": node.devpath, "bConfigurationValue": str(config.value),
        "bNumInterfaces": f"{len(config.interfaces):2d}", "bmAttributes": f"{configs[0][7]:02x}",
        "bMaxPower": f"{configs[0][8] * (8 if node.speed == 'super' else 2)}mA",
        "maxchild": str(maxchild), "authorized": "1", "removable": "unknown",
        "rx_lanes": "1", "tx_lanes": "1",  # Linux >= 4.18 has them on every device; lsusb -t reads both
    }
    for key, text in (("manufacturer", manufacturer), ("product", product), ("serial", serial)):
        if text is not None:
            attrs[key] = text
    # no newline after "dev": umockdev's remove_device() unlinks /sys/dev/char/<the attribute's text>
    attrs = {k: v + "\n" for k, v in attrs.items()} | {"dev": f"{USB_MAJOR}:{props['MINOR']}"}
    records = [Record(node.syspath, props, attrs,
                      {"descriptors": device_descriptor + b"".join(configs)},
                      {"driver": relative_link(node.syspath, "/sys/bus/usb/drivers/usb")})]
    prefix = f"{node.busnum}-0" if node.devpath == "0" else node.name  # a root hub's interfaces: "1-0:1.0"
    for i in config.interfaces:
        path = f"{node.syspath}/{prefix}:{config.value}.{i.number}"
        iprops = {
            "SUBSYSTEM": "usb", "DEVTYPE": "usb_interface", "PRODUCT": props["PRODUCT"], "TYPE": dclass,
            "INTERFACE": f"{i.cls}/{i.subclass}/{i.protocol}",
            "MODALIAS": (f"usb:v{vid:04X}p{pid:04X}d{bcd:04X}dc{d[4]:02X}dsc{d[5]:02X}dp{d[6]:02X}"
                         f"ic{i.cls:02X}isc{i.subclass:02X}ip{i.protocol:02X}in{i.number:02X}"),
        }
        links = {}
        if i.number in interface_drivers:
            iprops["DRIVER"] = interface_drivers[i.number]
            links["driver"] = relative_link(path, f"/sys/bus/usb/drivers/{interface_drivers[i.number]}")
        iattrs = {
            "bInterfaceNumber": f"{i.number:02x}", "bAlternateSetting": " 0",
            "bInterfaceClass": f"{i.cls:02x}", "bInterfaceSubClass": f"{i.subclass:02x}",
            "bInterfaceProtocol": f"{i.protocol:02x}",
            "bNumEndpoints": f"{len(i.endpoints):02x}", "authorized": "1", "modalias": iprops["MODALIAS"],
        }
        records.append(Record(path, iprops, {k: v + "\n" for k, v in iattrs.items()}, {}, links))
    return records


def _ident_tag(id_path: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "_", id_path)


@dataclass(frozen=True)
class DiskNode:
    """Where a disk sits: SCSI host ``host``, LUN ``lun``, under the mass-storage interface."""

    interface_syspath: str
    interface_id_path: str  # "pci-0000:00:14.0-usb-0:1.4:1.0"
    host: int
    lun: int
    name: str  # "sdb"
    index: int  # sd index: minor = 16 * index

    @property
    def host_syspath(self) -> str:
        return f"{self.interface_syspath}/host{self.host}"

    @property
    def target_syspath(self) -> str:
        return f"{self.host_syspath}/target{self.host}:0:0"

    @property
    def scsi_syspath(self) -> str:
        return f"{self.target_syspath}/{self.host}:0:0:{self.lun}"

    @property
    def block_syspath(self) -> str:
        return f"{self.scsi_syspath}/block/{self.name}"

    @property
    def devname(self) -> str:
        return f"/dev/{self.name}"


def scsi_host_records(disk: DiskNode) -> list[Record]:
    return [Record(disk.host_syspath, {"SUBSYSTEM": "scsi", "DEVTYPE": "scsi_host"}, {}, {}, {}),
            Record(disk.target_syspath, {"SUBSYSTEM": "scsi", "DEVTYPE": "scsi_target"}, {}, {}, {})]


def disk_records(disk: DiskNode, vendor: str, model: str, size: int, usb: dict[str, str]) -> list[Record]:
    """The scsi_device and its ``sdX`` block device; ``usb`` carries the ID_* of the USB device."""
    vendor8, model16 = vendor[:8].ljust(8), model[:16].ljust(16)
    id_path = f"{disk.interface_id_path}-scsi-0:0:0:{disk.lun}"
    minor = 16 * disk.index
    scsi = Record(
        disk.scsi_syspath,
        {"SUBSYSTEM": "scsi", "DEVTYPE": "scsi_device", "DRIVER": "sd", "MODALIAS": "scsi:t-0x00"},
        {"vendor": vendor8 + "\n", "model": model16 + "\n", "rev": "0001\n", "type": "0\n",
         "state": "running\n", "scsi_level": "7\n"},
        {}, {"driver": relative_link(disk.scsi_syspath, "/sys/bus/scsi/drivers/sd")})
    block = Record(
        disk.block_syspath,
        {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": disk.devname, "MAJOR": str(SCSI_DISK_MAJOR),
         "MINOR": str(minor), "ID_BUS": "usb", "ID_TYPE": "disk", "ID_USB_DRIVER": "usb-storage",
         "ID_VENDOR": _ident(vendor8), "ID_MODEL": _ident(model16), "ID_INSTANCE": f"0:{disk.lun}",
         "ID_SERIAL": f"{usb['ID_SERIAL']}-0:{disk.lun}", "ID_VENDOR_ID": usb["ID_VENDOR_ID"],
         "ID_MODEL_ID": usb["ID_MODEL_ID"], "ID_PATH": id_path, "ID_PATH_TAG": _ident_tag(id_path)},
        {"dev": f"{SCSI_DISK_MAJOR}:{minor}", "size": f"{size // 512}\n", "removable": "1\n", "ro": "0\n",
         "range": "16\n", "ext_range": "256\n"},
        {}, {"device": "../../../" + disk.scsi_syspath.rsplit("/", 1)[1]})
    return [scsi, block]
