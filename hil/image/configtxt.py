"""config.txt as the firmware of one model reads it (Raspberry Pi's config.txt documentation, conditional filters).

One parser for the library (what a flashed image will do at boot) and the virtual module (what it does).
"""

from __future__ import annotations

from dataclasses import dataclass

#: config.txt section filters each model obeys (besides [all]).
_FILTERS = {"cm1": {"pi1", "cm1"}, "cm3": {"pi3", "cm3"}, "cm3+": {"pi3", "cm3+"}, "cm4": {"pi4", "cm4"},
            "cm4s": {"pi4", "cm4s"}, "cm5": {"pi5", "cm5"}}


@dataclass(frozen=True)
class BootConfig:
    """config.txt as the firmware of one model reads it: later lines win, other models' sections skipped."""

    values: dict[str, str]
    dtparams: frozenset[str] = frozenset()  # every dtparam= value (they add up, unlike other keys)

    @classmethod
    def parse(cls, text: str, model: str) -> BootConfig:
        values: dict[str, str] = {}
        dtparams: set[str] = set()
        active = True
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("[") and line.endswith("]"):
                name = line[1:-1].strip().lower()
                active = name == "all" or name in _FILTERS[model]
            elif active and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
                if key.strip() == "dtparam":
                    dtparams.update(v.strip() for v in value.split(","))
        return cls(values, frozenset(dtparams))

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.values.get(key)
        return default if value is None else value.strip() not in ("0", "")

