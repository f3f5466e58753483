"""The virtual module's relay board: gpiozero's mock pins, observed so the module can react to them.

Framework code drives relays exactly as on hardware, with ``gpiozero.OutputDevice(gpio, active_high=...,
pin_factory=F)``; F here is a :class:`MockFactory` whose pins report every change of the level they
drive. gpiozero has no public change hook for outputs, hence the :class:`MockPin` subclass.

A level of ``None`` means the line is not driven (never set up as an output, or released by
``close()``): the relay board's own pull resistor then decides, as the rig file's ``rest`` says (or
``[virtual.relays]`` where the modelled board differs), and an input read of the GPIO sees that pull level.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPin

#: A Compute Module 4 (2 GB, rev 1.0), so ``board_info`` describes a CM rather than gpiozero's default 3B.
BOARD_REVISION = "b03140"

Level = bool | None
Watcher = Callable[[Level], None]


class ObservedPin(MockPin):
    """A mock pin that tells its factory whenever the level it drives changes."""

    def __init__(self, factory: Any, info: Any):
        self._published: Level = None
        self._quiet = False
        super().__init__(factory, info)
        self._rest()

    @property
    def driven_level(self) -> Level:
        return bool(self._state) if self._function == "output" else None

    def output_with_state(self, state: Any) -> None:
        # Set function and level as one step: an active-low relay must not click on the way.
        self._quiet = True
        try:
            super().output_with_state(state)
        finally:
            self._quiet = False
        self._publish()

    def _set_function(self, value: str) -> None:
        super()._set_function(value)
        if value == "input":
            self._rest()
        self._publish()

    def _rest(self) -> None:
        """Undriven, the pin reads the level the relay board pulls it to (when the board says one)."""
        factory = self.factory
        level = factory.pulls.get(int(self.info.name[4:])) if isinstance(factory, RelayBoardFactory) else None
        if level is not None and self._function == "input":
            self._change_state(level)

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        self._publish()
        return changed

    def _publish(self) -> None:
        level = self.driven_level
        if self._quiet or level == self._published:
            return
        self._published = level
        factory = self.factory
        if isinstance(factory, RelayBoardFactory):
            factory.notify(int(self.info.name[4:]), level)


class RelayBoardFactory(MockFactory):
    """The process-wide mock factory; virtual modules (each with its own GPIOs) watch their lines on it."""

    def __init__(self) -> None:
        super().__init__(revision=BOARD_REVISION, pin_class=ObservedPin)
        self._watch_lock = threading.Lock()
        self._watchers: dict[int, list[Watcher]] = {}
        self.pulls: dict[int, bool] = {}  # GPIO -> the level the board's resistor gives it when undriven

    def set_pull(self, gpio: int, level: bool) -> None:
        """The relay board pulls ``gpio`` to ``level`` whenever nothing drives it."""
        self.pulls[gpio] = level
        self._settle(gpio)

    def clear_pull(self, gpio: int) -> None:
        """The board that pulled ``gpio`` is gone (its virtual rig closed): the GPIO floats again."""
        self.pulls.pop(gpio, None)

    def _settle(self, gpio: int) -> None:
        for info, pin in self.pins.items():
            if info.name == f"GPIO{gpio}" and isinstance(pin, ObservedPin):
                pin._rest()

    def watch(self, gpio: int, callback: Watcher) -> Callable[[], None]:
        """Call ``callback(level)`` on every change of what ``gpio`` drives; returns the unsubscribe call.

        Callbacks run in the thread that changed the pin, so they must return quickly.
        """
        with self._watch_lock:
            self._watchers.setdefault(gpio, []).append(callback)

        def unwatch() -> None:
            with self._watch_lock:
                callbacks = self._watchers.get(gpio, [])
                if callback in callbacks:
                    callbacks.remove(callback)

        return unwatch

    def level(self, gpio: int) -> Level:
        """What ``gpio`` drives now (None: not driven)."""
        for info, pin in self.pins.items():
            if info.name == f"GPIO{gpio}" and isinstance(pin, ObservedPin):
                return pin.driven_level
        return None

    def notify(self, gpio: int, level: Level) -> None:
        with self._watch_lock:
            callbacks = list(self._watchers.get(gpio, ()))
        for callback in callbacks:
            callback(level)

    def reset(self) -> None:
        """gpiozero's test-suite reset forgets every pin: for the relays that is the GPIOs being released."""
        released = [int(pin.info.name[4:]) for pin in self.pins.values()
                    if isinstance(pin, ObservedPin) and pin.driven_level is not None]
        super().reset()
        for gpio in released:
            self.notify(gpio, None)


_install_lock = threading.Lock()
_factory: RelayBoardFactory | None = None


def mock_factory() -> RelayBoardFactory:
    """The process-wide relay board, installed as ``gpiozero.Device.pin_factory`` unless it already is."""
    global _factory
    with _install_lock:
        if _factory is None:
            _factory = RelayBoardFactory()
        if Device.pin_factory is not _factory:
            Device.pin_factory = _factory
        return _factory
