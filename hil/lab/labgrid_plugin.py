"""labgrid plugins (not a fork): the ``CmHilRig`` resource, a driver that runs this framework's flows on the
controller that holds the rig, and a strategy off -> flashed -> booted. Load them from a labgrid environment::

    imports: [hil.lab.labgrid_plugin]
    targets:
      main:
        resources: {RemotePlace: {name: cm4-a}}
        drivers: {CmHilDriver: {}, CmHilStrategy: {image: root}}
    images: {root: /path/to/image.img}

The driver runs ``hil power off``, ``hil flash`` and ``hil boot --json`` for the rig's file on its controller
(:class:`hil.lab.controllers.Controller`: here, or over ssh; the image is copied there once and cached), in the
name of whoever acquired the place, so the rig's own lock sees the place as already theirs and uses it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
from typing import Any

import attr
from labgrid.driver import Driver
from labgrid.factory import target_factory
from labgrid.resource.common import Resource
from labgrid.step import step
from labgrid.strategy import Strategy, StrategyError, never_retry

from hil.lab.controllers import Controller


def _text(default: str = "") -> Any:
    """A text field (each field needs its own attr.ib: one shared instance would be one attribute to attrs)."""
    return attr.ib(default=default, validator=attr.validators.instance_of(str))


def _optional(kind: type) -> Any:
    return attr.ib(default=None, validator=attr.validators.optional(attr.validators.instance_of(kind)))


@target_factory.reg_resource
@attr.s(eq=False)
class CmHilRig(Resource):
    """One rig as ``hil lab serve`` exports it (see :func:`hil.lab.exporter.rig_params`)."""

    rig: str = _text()
    rig_file: str = _text()
    controller: str = _text()
    host: str = _text()
    python: str = _text()
    workdir: str = _text()
    reports: str = _text()
    site: str = _text()
    model: str = _text()
    usb_port: str = _text()
    usb_ports: str = _text()
    console: str = _text()
    console_baud: int | None = _optional(int)
    power: str = _text("relay")
    virtual: bool | None = _optional(bool)
    power_gpio: int | None = _optional(int)
    power_active_high: bool | None = _optional(bool)
    power_pin_factory: str | None = _optional(str)
    nrpi_boot_gpio: int | None = _optional(int)
    nrpi_boot_active_high: bool | None = _optional(bool)
    nrpi_boot_pin_factory: str | None = _optional(str)
    eeprom_nwp_gpio: int | None = _optional(int)
    eeprom_nwp_active_high: bool | None = _optional(bool)
    eeprom_nwp_pin_factory: str | None = _optional(str)


def labgrid_holder() -> dict[str, str]:
    """The environment that makes a ``hil`` command act as this labgrid client (``HOST/USER``), which holds
    the place: the rig's lock then uses the place instead of refusing it."""
    return {"LG_HOSTNAME": os.environ.get("LG_HOSTNAME") or socket.gethostname(),
            "HIL_HOLDER": os.environ.get("LG_USERNAME") or getpass.getuser()}


@target_factory.reg_driver
@attr.s(eq=False)
class CmHilDriver(Driver):
    """This framework's flows for the bound rig, run on its controller."""

    bindings = {"rig": "CmHilRig"}
    timeout: float = attr.ib(default=3600.0, validator=attr.validators.instance_of(float))

    def on_activate(self) -> None:
        pass

    def on_deactivate(self) -> None:
        pass

    @property
    def controller(self) -> Controller:
        r = self.rig
        return Controller(r.controller, r.host, r.python, r.workdir, r.reports)

    def _hil(self, *args: str) -> str:
        env = labgrid_holder()
        command = self.controller.hil(*args, "--rig", self.rig.rig_file, env=env)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout, check=False,
                                  env={**os.environ, **env})
        except subprocess.TimeoutExpired:
            raise StrategyError(f"hil {args[0]} on {self.rig.rig} took over {self.timeout:g} s") from None
        if done.returncode:
            raise StrategyError(f"hil {' '.join(args)} on rig {self.rig.rig} ({self.rig.controller}) exited "
                                f"{done.returncode}: {done.stderr.strip()[-800:]}")
        return done.stdout

    @Driver.check_active
    @step()
    def power_off(self) -> None:
        self._hil("power", "off")

    @Driver.check_active
    @step(args=["image"])
    def flash(self, image: str) -> None:
        from pathlib import Path

        self._hil("flash", self.controller.put_image(Path(image)))

    @Driver.check_active
    @step()
    def boot(self, expect_build_id: str | None = None) -> dict[str, Any]:
        """Power-cycle from the eMMC and prove what booted; the boot record (build-id, milestone times)."""
        record = self._hil("boot", "--json", *(["--expect-build-id", expect_build_id] if expect_build_id else []))
        return dict(json.loads(record))


@target_factory.reg_driver
@attr.s(eq=False)
class CmHilStrategy(Strategy):
    """off -> flashed (the environment's image named ``image``) -> booted. ``booted`` flashes first unless the
    module was flashed in this session or ``image`` is empty (then it boots what the eMMC holds)."""

    bindings = {"rig": "CmHilDriver"}
    image: str = _text("root")
    status: str = attr.ib(default="unknown")
    boot_record: dict[str, Any] | None = None

    STATES = ("off", "flashed", "booted")

    @never_retry
    @step(args=["status"])
    def transition(self, status: str, *, step: Any) -> None:  # noqa: ARG002 - labgrid's step passes itself
        status = getattr(status, "name", status)
        if status not in self.STATES:
            raise StrategyError(f"no state {status}: use one of {', '.join(self.STATES)}")
        if status == self.status:
            return
        self.target.activate(self.rig)
        if status == "off":
            self.rig.power_off()
        elif status == "flashed":
            if not self.image:
                raise StrategyError("no image to flash: set CmHilStrategy's image to a key of the environment's "
                                    "images")
            self.rig.flash(self.target.env.config.get_image_path(self.image))
        elif status == "booted":
            if self.image and self.status != "flashed":
                self.transition("flashed")
            self.boot_record = self.rig.boot()
        self.status = status
