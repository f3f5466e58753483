"""Native USB device boot ("rpiboot") host, bound to one USB port path (usbboot-protocol.md)."""

from hil.usbboot.host import UsbBoot, UsbBootResult

__all__ = ["UsbBoot", "UsbBootResult"]
