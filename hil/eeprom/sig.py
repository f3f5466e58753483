"""``pieeprom.sig``: the SHA-256 of ``pieeprom.bin`` that recovery.bin checks before it writes the EEPROM.

As ``rpi-eeprom-digest`` writes it: the lowercase hex digest on the first line, then ``ts: <unix time>``, then
``rsa2048: <hex>`` when signed for secure boot. recovery.bin refuses an image whose digest does not match, and
a stale .sig next to a rebuilt image is the most common way an update "does nothing" (usbboot PR #239), so
the flash flow checks it here, before anything is sent to a module.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from hil.errors import InputError

STAGE = "eeprom.sig"
_FIX = "Fix: regenerate it with `hil eeprom build` (or rpi-eeprom-digest -i pieeprom.bin -o pieeprom.sig)"


@dataclass(frozen=True)
class Sig:
    sha256: str
    timestamp: int
    rsa2048: str | None = None


def sig_text(image: bytes, timestamp: int | None = None) -> str:
    """The .sig for ``image``; ``timestamp`` defaults to now (rpi-eeprom-digest without SOURCE_DATE_EPOCH)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"{hashlib.sha256(image).hexdigest()}\nts: {ts}\n"


def parse_sig(text: str, source: object = "pieeprom.sig") -> Sig:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not re.fullmatch(r"[0-9a-fA-F]{64}", lines[0]):
        raise InputError(f"{source} does not start with a SHA-256 hex digest. {_FIX}", stage=STAGE)
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    ts = fields.get("ts", "").strip()
    if not ts.isdigit():
        raise InputError(f"{source} has no 'ts: <unix time>' line. {_FIX}", stage=STAGE)
    rsa = fields.get("rsa2048")
    return Sig(lines[0].lower(), int(ts), rsa.strip() if rsa else None)


def read_sig(path: Path) -> Sig:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise InputError(f"{path} is missing: recovery.bin refuses to write an image without it. {_FIX}",
                         stage=STAGE, file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path} cannot be read ({e}). {_FIX}", stage=STAGE, file=str(path)) from None
    return parse_sig(text, path)


def write_sig(path: Path, image: bytes, timestamp: int | None = None) -> Sig:
    text = sig_text(image, timestamp)
    path.write_text(text, encoding="ascii")
    return parse_sig(text, path)


def check_sig(image: bytes, sig: Sig, image_source: object = "pieeprom.bin",
              sig_source: object = "pieeprom.sig") -> None:
    """The image is the one the .sig describes."""
    digest = hashlib.sha256(image).hexdigest()
    if digest != sig.sha256:
        raise InputError(f"{sig_source} (sha256 {sig.sha256[:16]}...) does not match {image_source} (sha256 "
                         f"{digest[:16]}...): recovery.bin would refuse the update. {_FIX}", stage=STAGE,
                         sig=sig.sha256, image=digest)
