"""Guard checks for real carriers: is this the module's own disk, by USB identity and by declared size?

A same-size USB stick on a wrong port path, or the NVMe drive that mass-storage-gadget64 exports beside the
eMMC on a CM4/CM5 carrier with an M.2 slot, must never be taken for the eMMC (real-hardware-review.md, "Disk
discovery and guard"). A Raspberry Pi module in mass-storage mode is 0a5c:0001 (legacy msd firmware) or
0a5c:0104 (mass-storage-gadget64), and its eMMC is a little smaller than the size printed on it.
"""

from __future__ import annotations

from hil.disk.discovery import TARGETS, Disk
from hil.models import BROADCOM_VID, GADGET_PID, MSD_PID
from hil.rig import Rig

MASS_STORAGE_IDS = (f"{BROADCOM_VID:04x}:{MSD_PID:04x}", f"{BROADCOM_VID:04x}:{GADGET_PID:04x}")
#: How much smaller than the declared (printed, decimal) size a real eMMC's user area may be; never larger.
EMMC_TOLERANCE = 0.15


def identity_problem(disk: Disk) -> str | None:
    """Why ``disk`` is not behind a Raspberry Pi mass-storage device, or None."""
    if disk.usb_id.lower() in MASS_STORAGE_IDS:
        return None
    return (f"its USB device is {disk.usb_id or 'unknown'}, not a Raspberry Pi module in mass-storage mode "
            f"({' or '.join(MASS_STORAGE_IDS)})")


def size_ok(rig: Rig, size: int) -> bool:
    """Within the rig's declared eMMC: exactly it on a virtual rig, else up to :data:`EMMC_TOLERANCE` below it."""
    if rig.is_virtual:
        return size == rig.emmc_size
    return (1 - EMMC_TOLERANCE) * rig.emmc_size <= size <= rig.emmc_size


def target_problem(disk: Disk, rig: Rig) -> str | None:
    """Why ``disk`` is not the disk the rig writes (``[usb] disk``), or None. The legacy msd firmware exports
    only the eMMC; mass-storage-gadget64 names each disk by its device (``mmcblk0``, ``nvme0n1``)."""
    target = rig.usb_boot.disk
    gadget = disk.usb_id.lower() == MASS_STORAGE_IDS[1]
    if target == "emmc" and not (gadget and disk.vendor.lower().startswith(TARGETS["nvme"])):
        return None
    if target == "nvme" and gadget and disk.vendor.lower().startswith(TARGETS["nvme"]):
        return None
    return f"it is the module's {'NVMe drive' if target == 'emmc' else 'eMMC'}, and the rig writes its {target}"
