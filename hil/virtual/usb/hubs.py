"""Root and intermediate hubs on the virtual bus: descriptors and chapter 9 requests only."""

from __future__ import annotations

import struct
import threading

from hil.virtual.usb.descriptors import INTERRUPT, Descriptors, Endpoint, Interface, StandardRequests, config_descriptor
from hil.virtual.usb.device import ControlSetup, Stall


class HubModel:
    """Root and intermediate hubs: chapter 9 requests only. They exist because libusb derives a device's
    port path from the hub devices it finds, and because a host may open any device it lists."""

    def __init__(self, descriptors: Descriptors):
        self.identity = descriptors.identity()
        self._standard = StandardRequests(descriptors)

    def control(self, setup: ControlSetup, data: bytes, cancel: threading.Event) -> bytes:
        reply = self._standard.handle(setup, data)
        if reply is None:
            raise Stall("hub class requests are not modelled")
        return reply

    def bulk_out(self, endpoint: int, data: bytes, cancel: threading.Event) -> int:
        raise Stall("a hub has no bulk endpoints")

    def bulk_in(self, endpoint: int, length: int, cancel: threading.Event) -> bytes:
        raise Stall("a hub has no bulk endpoints")


def hub(vid: int, pid: int, bcd: int, strings: dict[int, str]) -> HubModel:
    device = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 9, 0, 1, 64, vid, pid, bcd,
                         3 if 3 in strings else 1, 2, 1 if 3 in strings else 0, 1)
    status = Interface(0, 9, 0, 0, (Endpoint(0x81, INTERRUPT, 4, 12),))
    return HubModel(Descriptors(device, config_descriptor((status,), attributes=0xE0, max_power_ma=0),
                                 strings, "high"))
