"""The virtual module's USB side: runs the stage chain ROM -> second stage -> mass storage on a bus port.

Each power-on gets a fresh :class:`DeviceEnv` and one chain thread; every wait in the chain and in the
models watches the power-cut event, so :meth:`VirtualUsb.power_off` takes everything off the bus at once
and the thread ends promptly. Delays are hardware seconds (usbboot-protocol.md section 8), scaled by the
:class:`DeviceClock`.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

from hil.errors import InputError
from hil.models import ModuleModel
from hil.virtual.eeprom import VirtualEeprom
from hil.virtual.journal import Journal
from hil.virtual.timing import DeviceClock
from hil.virtual.usb.bootrom import BootRom
from hil.virtual.usb.device import BlockChild, UsbBusPort, UsbDeviceModel
from hil.virtual.usb.massstorage import MassStorage, gadget_disk, msd_disk
from hil.virtual.usb.stage2 import SecondStage
from hil.virtual.usb.switches import DeviceEnv, UsbSwitches, default_switches

ROM_APPEARS = 0.3  # power applied with nRPI_BOOT low -> ROM enumerated
ROM_LEAVES = 0.05  # status sent -> ROM off the bus
ROM_LINGER = 1.5  # the same with rom_double_sighting
STAGE2_APPEARS = 1.35  # ROM gone -> second stage enumerated (about 1.4 s in all, PR #9, #12, #69)
RECONNECT = 1.0  # dropped off mid-download -> ROM enumerates again
DONE_LEAVES = 0.05  # Done -> second stage off the bus
MSD_APPEARS = 0.27  # msd firmware up (PR #9 dmesg)
GADGET_APPEARS = 6.0  # Linux boots and binds the configfs gadget (at least 5 s, buildroot configure-gadgets)


class _Off(Exception):
    """Power was cut while the chain was running."""


class VirtualUsb:
    """The USB side of one virtual module, attached to ``bus_port`` (``hil.virtual.module.UsbSide``).

    ``eeprom`` is the module's SPI EEPROM that recovery writes (default: a fresh one in memory)."""

    def __init__(self, model: ModuleModel, bus_port: UsbBusPort, emmc_block_device: str, emmc_size: int,
                 switches: UsbSwitches | None, clock: DeviceClock, journal: Journal,
                 extra_port_factory: Callable[[str], UsbBusPort] | None = None, *, serial: str | None = None,
                 eeprom: VirtualEeprom | None = None, nvme_block_device: str | None = None):
        self.model = model
        self.port = bus_port
        self.emmc_block_device = emmc_block_device
        self.emmc_size = emmc_size
        self.nvme_block_device = nvme_block_device  # the carrier's NVMe drive ([virtual.usb] nvme)
        self.switches = switches or default_switches(model)
        if self.switches.duplicate_disk and extra_port_factory is None:
            raise InputError("virtual.usb.duplicate_disk needs a USB bus that can add ports; "
                             "remove the switch or run the rig with the umockdev bus", stage="rig-file")
        self.clock = clock
        self.journal = journal
        self.serial = serial or f"{zlib.crc32(model.name.encode()):08x}"
        self._extra_port_factory = extra_port_factory
        self._lock = threading.Lock()
        self._env: DeviceEnv | None = None
        self._thread: threading.Thread | None = None
        self._attached: list[UsbBusPort] = []
        self._extra_ports: dict[str, UsbBusPort] = {}
        self.eeprom_chip = eeprom or (VirtualEeprom(model, None, journal) if model.has_eeprom else None)
        self.state = "off"

    @property
    def eeprom(self) -> bytes:
        """The SPI bootloader EEPROM's contents, as recovery left them (kept across power cycles)."""
        return self.eeprom_chip.contents() if self.eeprom_chip is not None else b""

    def power_on(self, usb_boot: bool) -> None:
        with self._lock:
            if self._env is not None:
                return
            self._env = DeviceEnv(self.model, self.switches, self.clock, self.journal, self.serial)
        if not usb_boot:
            self.state = "emmc-boot"  # boots from its eMMC: nothing appears on the USB slave port
            return
        self._thread = threading.Thread(target=self._run, args=(self._env,), daemon=True,
                                        name=f"virtual-usb-{self.port.port}")
        self._thread.start()

    def power_off(self) -> None:
        with self._lock:
            env, self._env = self._env, None
            if env is None:
                return
            env.power_cut.set()
            for port in self._attached:
                port.detach()
            self._attached.clear()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        self.state = "off"

    # --- the chain --------------------------------------------------------------------------------

    def _run(self, env: DeviceEnv) -> None:
        try:
            final = self._chain(env)
        except _Off:
            return
        except Exception as e:  # a bug in a model must show in the journal, not vanish with the thread
            self.journal.record("fault", "virtual USB crashed", error=repr(e))
            raise
        self._set_state(env, final)
        self.journal.record("stage", "final", state=final)

    def _chain(self, env: DeviceEnv) -> str:
        sw = env.switches
        while True:
            self._sleep(env, ROM_APPEARS)
            rom = BootRom(env)
            self._attach(env, self.port, rom, "rom")
            result = rom.wait_result()
            if result is None:
                raise _Off
            if not result.disconnected:
                break
            self._detach(env, self.port)
            self._set_state(env, "disconnected")
            self._sleep(env, RECONNECT)
        assert result.program is not None
        self._sleep(env, ROM_LINGER if sw.rom_double_sighting else ROM_LEAVES)
        self._detach(env, self.port)
        self._sleep(env, STAGE2_APPEARS)
        stage2 = SecondStage(env, result.program, self.eeprom_chip)
        self._attach(env, self.port, stage2, "second-stage", program=result.program.program)
        outcome = stage2.run()
        if outcome is None:
            raise _Off
        if not outcome.leaves_bus:
            return outcome.next
        if sw.no_detach_after_done:
            self.journal.record("fault", "no_detach_after_done", stage="second-stage")
            return "stuck-after-done"
        self._sleep(env, DONE_LEAVES)
        self._detach(env, self.port)
        if outcome.next == "rebooted":
            return "rebooted"
        if sw.no_mass_storage:
            self.journal.record("fault", "no_mass_storage", program=outcome.next)
            return "no-mass-storage"
        self._sleep(env, MSD_APPEARS if outcome.next == "msd" else GADGET_APPEARS)
        make_disk = msd_disk if outcome.next == "msd" else gadget_disk
        make_device = MassStorage.msd if outcome.next == "msd" else MassStorage.gadget
        size = 0 if sw.late_disk else self.emmc_size
        if outcome.next != "msd" and sw.nvme and self.nvme_block_device:  # the gadget exports the NVMe too
            device = MassStorage.gadget(env, gadget_disk(self.emmc_block_device, size),
                                        gadget_disk(self.nvme_block_device, sw.nvme, "nvme0n1"))
        else:
            device = make_device(env, make_disk(self.emmc_block_device, size))
        self._attach(env, self.port, device, "mass-storage", program=outcome.next, size=size)
        if sw.duplicate_disk:
            self._duplicate(env, sw.duplicate_disk, make_device, make_disk)
        if sw.late_disk:
            self.journal.record("fault", "late_disk", seconds=sw.late_disk)
            self._sleep(env, sw.late_disk)
            disk = make_disk(self.emmc_block_device, self.emmc_size)
            with self._lock:
                self._check(env)
                self.port.update_disks((disk,))
            self.journal.record("stage", "medium", size=self.emmc_size)
        return "mass-storage"

    def _duplicate(self, env: DeviceEnv, path: str,
                   make_device: Callable[[DeviceEnv, BlockChild], MassStorage],
                   make_disk: Callable[[str, int], BlockChild]) -> None:
        assert self._extra_port_factory is not None
        if path not in self._extra_ports:
            self._extra_ports[path] = self._extra_port_factory(path)
        twin = DeviceEnv(env.model, env.switches, env.clock, env.journal, f"{zlib.crc32(path.encode()):08x}",
                         env.power_cut)
        self.journal.record("fault", "duplicate_disk", port=path)
        device = make_device(twin, make_disk(self.emmc_block_device, self.emmc_size))
        self._attach(env, self._extra_ports[path], device, "duplicate-disk")

    def _sleep(self, env: DeviceEnv, seconds: float) -> None:
        if not self.clock.sleep(seconds, env.power_cut):
            raise _Off

    def _check(self, env: DeviceEnv) -> None:
        if env.power_cut.is_set():
            raise _Off

    def _attach(self, env: DeviceEnv, port: UsbBusPort, device: UsbDeviceModel, stage: str,
                **details: object) -> None:
        with self._lock:
            self._check(env)
            port.attach(device)
            self._attached.append(port)
            self.state = stage
        ident = device.identity
        self.journal.record("stage", stage, port=port.port, id=f"{ident.vid:04x}:{ident.pid:04x}",
                            iserial=ident.iserial, speed=ident.speed, **details)

    def _detach(self, env: DeviceEnv, port: UsbBusPort) -> None:
        with self._lock:
            self._check(env)
            port.detach()
            self._attached.remove(port)

    def _set_state(self, env: DeviceEnv, state: str) -> None:
        with self._lock:
            if self._env is env:
                self.state = state
