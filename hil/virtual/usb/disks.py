"""The SCSI disks a mass-storage device brings onto the virtual bus: sysfs records and ``/dev/sdX`` nodes."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from typing import Any

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

from hil.errors import InfrastructureError  # noqa: E402
from hil.virtual.usb import sysfs  # noqa: E402
from hil.virtual.usb.device import BlockChild  # noqa: E402
from hil.virtual.usb.enumeration import Enumeration  # noqa: E402

STAGE = "usb.transport"


class Disks:
    """The disks on one testbed: names sda, sdb, ... as the sd driver hands them out, SCSI host numbers,
    and the block nodes whose ioctls pass through to the disk's target."""

    def __init__(self, testbed: Any, root_dir: str, remove_records: Callable[[list[sysfs.Record]], None]):
        self._testbed = testbed
        self.root_dir = root_dir
        self._remove_records = remove_records
        self._sd_names: set[str] = set()
        self.block_handlers: set[str] = set()  # /dev/sdX nodes whose ioctls pass through to the target
        self._next_scsi_host = 0

    def forget_testbed(self) -> None:
        """Drop the testbed reference, so the bus's close can finalize the testbed (and remove its folder)."""
        self._testbed = None

    def set_disks(self, enumeration: Enumeration, disks: tuple[BlockChild, ...]) -> None:
        storage = [n for n, driver in enumeration.drivers.items() if driver == "usb-storage"]
        if disks and not storage:
            raise InfrastructureError(f"USB device on {enumeration.node.name} has disks but no mass-storage "
                                      "interface (class 8) to hang them on", stage=STAGE)
        current = enumeration.disks
        for lun in range(max(len(current), len(disks))):
            old = current[lun] if lun < len(current) else None
            new = disks[lun] if lun < len(disks) else None
            same_disk = old is not None and new is not None and (old[0].vendor, old[0].model) == (
                new.vendor, new.model)
            if same_disk:
                assert old is not None and new is not None
                if old[0] != new:
                    self._change_disk(old[1], old[0], new)
                    current[lun] = (new, old[1], old[2])
                continue
            if old is not None:
                self.remove_disk(old[1], old[2])
            if new is not None:
                entry = self._add_disk(enumeration, storage[0], lun, new)
                if lun < len(current):
                    current[lun] = entry
                else:
                    current.append(entry)
        del current[len(disks):]

    def _add_disk(self, enumeration: Enumeration, interface: int, lun: int,
                  disk: BlockChild) -> tuple[BlockChild, sysfs.DiskNode, list[sysfs.Record]]:
        node = enumeration.node
        interface_syspath = f"{node.syspath}/{node.name}:{enumeration.config.value}.{interface}"
        if enumeration.scsi_host_number < 0:
            enumeration.scsi_host_number = self._next_scsi_host
            self._next_scsi_host += 1
        index = next(i for i in range(702) if _sd_name(i) not in self._sd_names
                     and not os.path.lexists(os.path.join(self.root_dir, "dev", _sd_name(i))))
        interface_id = f"{node.id_path}:{enumeration.config.value}.{interface}"
        disk_node = sysfs.DiskNode(interface_syspath, interface_id, enumeration.scsi_host_number, lun,
                                   _sd_name(index), index)
        records = sysfs.disk_records(disk_node, disk.vendor, disk.model, disk.size,
                                     enumeration.records[0].properties)
        added = records
        if not enumeration.scsi_host:
            enumeration.scsi_host = sysfs.scsi_host_records(disk_node)
            added = enumeration.scsi_host + records
        self._disk_node(disk_node, disk.target)
        self._pass_block_ioctls(disk_node.devname)
        self._sd_names.add(disk_node.name)
        self._testbed.add_from_string("\n".join(r.text() for r in added))
        enumeration.record("disk", name=disk_node.devname, target=disk.target, size=disk.size)
        return disk, disk_node, records

    def _pass_block_ioctls(self, devname: str) -> None:
        """Let block ioctls (BLKGETSIZE64, BLKFLSBUF, ...) on ``/dev/sdX`` reach the target: umockdev
        answers ioctls on testbed nodes without a handler with ENOTTY. Kept until close, because a host
        may hold the node open past a detach and umockdev aborts a client whose handler went away."""
        if devname not in self.block_handlers:
            handler = UMockdev.IoctlBase()
            handler.connect("handle-ioctl", _pass_through)
            self._testbed.attach_ioctl(devname, handler)
            self.block_handlers.add(devname)

    def _change_disk(self, node: sysfs.DiskNode, old: BlockChild, new: BlockChild) -> None:
        if new.target != old.target:
            self._disk_node(node, new.target)
        self._testbed.set_attribute(node.block_syspath, "size", f"{new.size // 512}\n")
        self._testbed.uevent(node.block_syspath, "change")

    def remove_disk(self, node: sysfs.DiskNode, records: list[sysfs.Record]) -> None:
        self._remove_records(records)
        # remove_device() leaves the /sys/block link behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root_dir, "sys/block", node.name))
        self._sd_names.discard(node.name)

    def _disk_node(self, node: sysfs.DiskNode, target: str) -> None:
        """``/dev/sdX`` in the testbed reaches ``target``: a block node with the target's numbers when it is
        a block device (so stat() says block device, as for a real disk), else a symlink."""
        path = os.path.join(self.root_dir, "dev", node.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        try:
            info = os.stat(target)
        except OSError as e:
            raise InfrastructureError(f"disk {node.name} should reach {target}, which cannot be used: {e}",
                                      stage=STAGE) from e
        if stat.S_ISBLK(info.st_mode):
            try:
                os.mknod(path, stat.S_IFBLK | 0o660, info.st_rdev)
                os.chmod(path, 0o660 | stat.S_ISVTX)  # umockdev's mark for "block device" in stat()
                return
            except PermissionError:
                pass  # not root: a symlink still reaches the data
        os.symlink(target, path)



def _pass_through(_handler: Any, ic: Any) -> bool:
    result, code = ic.execute()
    ic.complete(result, code)
    return True


def _sd_name(index: int) -> str:
    """sda .. sdz, sdaa .. sdzz, as the sd driver names disks."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "sd" + (letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26])

