"""Config updates byte-identical with Raspberry Pi's ``rpi-eeprom-config --config``.

:func:`reference_update` is the reference's algorithm re-derived from its public source (raspberrypi/rpi-eeprom
at 86759b0, ``rpi-eeprom-config``: ``BootloaderImage.find_file`` and ``update``), written out here on its own
so that the project's :func:`hil.eeprom.pieeprom.embed_config` is compared with an independent statement of it:

1. The chain of 8-byte big-endian section headers (magic, length) is walked from offset 0, each section
   starting on the 8-byte boundary after the previous one; a magic of 0 or 0xffffffff ends it.
2. The ``bootconf.txt`` to rewrite is the first modifiable file (0x55aaf11f) of that name whose header lies in
   the window [64 KiB, 64 KiB + 988 KiB) = [0x10000, 0x107000): after the read-only part, inside partition A.
3. Its limit is the offset of the first later section that is not padding (0x55aafeef); with none, the
   window's end, but never into the last 4 KiB of the flash: min(size - 4 KiB, 0x107000).
4. The header's length becomes len(text) + 16 (name and reserved word); the text follows the 20-byte file
   header and reserved word; 0xff fills to the next 8-byte boundary.
5. If at least 8 bytes remain before the limit and ``bootconf.txt`` was not the last section of the chain,
   a padding header takes 8 of them (length 0 when exactly 8 remain); every remaining byte up to the limit
   becomes 0xff. Nothing at or after the limit changes.

The images are synthetic, shaped like the releases in rpi-eeprom's firmware-2711 and firmware-2712 folders
(section order and offsets as those releases have them; contents generated here).
"""

from __future__ import annotations

import random
import struct

import pytest

from hil.eeprom.pieeprom import embed_config, read_config, sections
from hil.errors import InputError
from hil.models import MODELS

CM4, CM5 = MODELS["cm4"], MODELS["cm5"]
SECTION, FILE, PAD, CODE = 0x55AAF00F, 0x55AAF11F, 0x55AAFEEF, 0x55AAF44F
HEADER = struct.Struct(">II")


def reference_update(image: bytes, text: bytes) -> bytes:
    """rpi-eeprom-config's bootconf.txt update, steps 1-5 of the module docstring."""
    out = bytearray(image)
    chain: list[tuple[int, int, int, bytes]] = []  # offset, magic, length, name
    offset = 0
    while offset < len(image):
        magic, length = HEADER.unpack_from(image, offset)
        if magic in (0, 0xFFFFFFFF):
            break
        name = image[offset + 8:offset + 20].rstrip(b"\0") if magic == FILE else b""
        chain.append((offset, magic, length, name))
        offset = (offset + 8 + length + 7) & ~7
    window = (64 * 1024, 64 * 1024 + 988 * 1024)
    index = next(i for i, (o, m, _, n) in enumerate(chain)
                 if m == FILE and n == b"bootconf.txt" and window[0] <= o < window[1])
    at = chain[index][0]
    limit = next((o for o, m, _, _ in chain[index + 1:] if m != PAD), min(len(image) - 4096, window[1]))
    is_last = index == len(chain) - 1
    HEADER.pack_into(out, at, FILE, len(text) + 16)
    out[at + 24:at + 24 + len(text)] = text
    pad_start = at + 24 + len(text)
    while pad_start % 8:
        out[pad_start] = 0xFF
        pad_start += 1
    pad = limit - pad_start
    if pad >= 8 and not is_last:
        HEADER.pack_into(out, pad_start, PAD, pad - 8)
        pad_start, pad = pad_start + 8, pad - 8
    out[pad_start:pad_start + max(pad, 0)] = b"\xff" * max(pad, 0)
    return bytes(out)


def build(size: int, layout: list[tuple[int, int, str, int]], tail_pads: tuple[tuple[int, int], ...] = ()) -> bytes:
    """An image from (offset, magic, file name or "", content length) sections; the gap after each is bridged
    with a padding section as releases have it, and ``tail_pads`` are (offset, end) padding sections."""
    rng = random.Random(size)
    out = bytearray(b"\xff" * size)
    for i, (offset, magic, name, length) in enumerate(layout):
        content = rng.randbytes(length)
        if magic == FILE:
            body = name.encode().ljust(12, b"\0") + bytes(4) + content
            if name == "bootconf.txt":
                body = name.encode().ljust(12, b"\0") + bytes(4) + b"[all]\nBOOT_UART=0\n"
        else:
            body = content
        HEADER.pack_into(out, offset, magic, len(body))
        out[offset + 8:offset + 8 + len(body)] = body
        end = (offset + 8 + len(body) + 7) & ~7
        following = layout[i + 1][0] if i + 1 < len(layout) else (tail_pads[0][0] if tail_pads else None)
        if following is not None and following - end >= 8:
            HEADER.pack_into(out, end, PAD, following - end - 8)
    for start, end in tail_pads:
        HEADER.pack_into(out, start, PAD, end - start - 8)
    return bytes(out)


def image_2712() -> bytes:
    """Like pieeprom-2026-08-12.bin: bootcode, updatetime, bootsys at 64 KiB, firmware, keys, bootconf.sig and
    bootconf.txt in partition A, partition B one padding section from 0x107000 to the journals at 0x1fe000."""
    return build(2 * 1024 * 1024, [
        (0x0, SECTION, "", 25976), (0x67A0, FILE, "updatetime", 8), (0x10000, FILE, "bootsys", 78356),
        (0x23448, CODE, "", 402251), (0x86000, CODE, "", 25488), (0xA1F38, FILE, "updatetime", 8),
        (0xA2000, FILE, "pubkey.bin", 512), (0xA2300, FILE, "cacert.der", 2048), (0xA2C00, FILE, "bootconf.sig", 1024),
        (0xA4000, FILE, "bootconf.txt", 0)], tail_pads=((0x107000, 0x1FE000),))


def image_2711() -> bytes:
    """Like pieeprom-2026-08-04.bin: bootcode, firmware, then updatetime, keys and bootconf.txt last."""
    return build(512 * 1024, [
        (0x0, SECTION, "", 73120), (0x11FC0, CODE, "", 212581), (0x71E20, FILE, "updatetime", 8),
        (0x71F00, FILE, "pubkey.bin", 512), (0x72200, FILE, "cacert.der", 2048),
        (0x72B00, FILE, "bootconf.sig", 1024), (0x73000, FILE, "bootconf.txt", 0)])


def image_8_byte_gap() -> bytes:
    """A 2711 image whose bootconf.txt block is followed by pubkey.bin at the next 4 KiB."""
    return build(512 * 1024, [(0x0, SECTION, "", 73120), (0x72000, FILE, "bootconf.txt", 0),
                              (0x73000, FILE, "pubkey.bin", 512)])


CONFIG = "[all]\nBOOT_UART=1\nBOOT_ORDER=0xf461\nPOWER_OFF_ON_HALT=1\n[cm5]\nPCIE_PROBE=1\n"


def test_a_2712_config_update_is_byte_identical_with_the_reference() -> None:
    source = image_2712()
    built = embed_config(source, CONFIG, CM5)
    assert built == reference_update(source, CONFIG.encode())
    assert read_config(built, CM5) == CONFIG
    chain = sections(built)
    assert (chain[-1].offset, chain[-1].magic, chain[-1].end) == (0x107000, PAD, 0x1FE000)  # partition B kept
    assert built[0x107000:] == source[0x107000:]


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 100, 1000, 4000, 4076])
@pytest.mark.parametrize("shape", [image_2711, image_2712])
def test_every_config_length_matches_the_reference(shape, length: int) -> None:
    source = shape()
    model = CM5 if len(source) == 2 * 1024 * 1024 else CM4
    text = ("#" * length)
    assert embed_config(source, text, model) == reference_update(source, text.encode())


def test_an_8_byte_gap_gets_an_empty_padding_header_and_keeps_what_follows() -> None:
    source = image_8_byte_gap()
    text = "#" * (0x1000 - 24 - 8)  # ends 8 bytes before pubkey.bin
    built = embed_config(source, text, CM4)
    assert built == reference_update(source, text.encode())
    assert built[0x72FF8:0x73000] == HEADER.pack(PAD, 0)
    assert [s.name for s in sections(built) if s.magic == FILE] == ["bootconf.txt", "pubkey.bin"]


def test_a_config_outside_the_updatable_window_is_not_rewritten() -> None:
    """The reference only rewrites a bootconf.txt in [64 KiB, 0x107000); one in the read-only part is refused."""
    source = build(512 * 1024, [(0x0, SECTION, "", 1000), (0x1000, FILE, "bootconf.txt", 0)])
    with pytest.raises(InputError, match="between 0x10000 and 0x107000"):
        embed_config(source, CONFIG, CM4)
