"""Make an EEPROM update: a boot.conf put into a bootloader image, and the .sig that goes with it.

What usbboot's ``update-pieeprom.sh`` does with ``rpi-eeprom-config --config`` and ``rpi-eeprom-digest``, with
the boot.conf validated for the module first (a setting the bootloader ignores is found here, not on a rig).
"""

from __future__ import annotations

from pathlib import Path

from hil.eeprom.bootconf import parse_bootconf
from hil.eeprom.pieeprom import embed_config
from hil.eeprom.sig import Sig, write_sig
from hil.models import ModuleModel

IMAGE_NAME = "pieeprom.bin"
SIG_NAME = "pieeprom.sig"


def build_update(out: Path, source: bytes, config: str, model: ModuleModel, *, source_name: object = "image",
                 config_name: object = "boot.conf", timestamp: int | None = None) -> Sig:
    """Write ``out/pieeprom.bin`` (``source`` carrying ``config``) and ``out/pieeprom.sig``."""
    parse_bootconf(config, model.name, config_name)
    image = embed_config(source, config, model, source_name)
    out.mkdir(parents=True, exist_ok=True)
    (out / IMAGE_NAME).write_bytes(image)
    return write_sig(out / SIG_NAME, image, timestamp)
