"""The pieeprom container, the .sig and building an update: stand-in images with the real layout."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from hil.eeprom.build import build_update
from hil.eeprom.pieeprom import (
    BOOTCONF,
    FILE_MAGIC,
    IMAGE_SIZES,
    MAX_FILE_SIZE,
    PAD_MAGIC,
    SECTION_MAGIC,
    embed_config,
    image_facts,
    read_config,
    sections,
    stand_in_image,
    stand_in_intact,
)
from hil.eeprom.sig import check_sig, parse_sig, read_sig, sig_text, write_sig
from hil.errors import InputError
from hil.models import MODELS

CM4, CM5 = MODELS["cm4"], MODELS["cm5"]
CONF = "[all]\nBOOT_UART=1\nBOOT_ORDER=0xf41\n"


def image(model=CM4, config: str = CONF) -> bytes:
    return stand_in_image(model, config, version="0123abcd", date="2025/01/02 TIME: 03:04:05", timestamp=1735787045)


def with_trailing_section(data: bytes) -> bytes:
    """The image with padding and then a modifiable file after bootconf.txt (as images that carry pubkey.bin)."""
    conf = next(s for s in sections(data) if s.name == BOOTCONF)
    after = conf.offset + 4096
    out = bytearray(data)
    gap = conf.next
    out[gap:gap + 8] = struct.pack(">II", PAD_MAGIC, after - gap - 8)
    out[after:after + 8] = struct.pack(">II", FILE_MAGIC, 16 + 4)
    out[after + 8:after + 20] = b"pubkey.bin".ljust(12, b"\0")
    return bytes(out)


@pytest.mark.parametrize("model", [CM4, CM5])
def test_stand_in_has_the_container_layout(model) -> None:
    data = image(model)
    assert len(data) == IMAGE_SIZES[model.chip_dir]
    chain = sections(data)
    # a 2 MiB image is A/B like the releases: partition A ends in padding, partition B is padding from 0x107000
    tail = [PAD_MAGIC, PAD_MAGIC] if model is CM5 else []
    assert [s.magic for s in chain] == [SECTION_MAGIC, FILE_MAGIC, *tail]
    assert model is CM4 or (chain[-1].offset, chain[-1].end) == (0x107000, len(data) - 8192)
    conf = chain[1]
    assert conf.name == BOOTCONF and conf.offset % 4096 == 0 and conf.offset + 4096 <= len(data) - 4096
    assert read_config(data, model) == CONF
    assert data[-4096:] == b"\xff" * 4096  # the bootloader's scratch block stays erased
    facts = image_facts(data)
    assert (facts.version, facts.date, facts.build_timestamp, facts.stand_in) == \
        ("0123abcd", "2025/01/02 TIME: 03:04:05", 1735787045, True)
    assert stand_in_intact(data, model.chip_dir) and not stand_in_intact(data, "2712" if model is CM4 else "2711")


def test_embed_replaces_only_the_config_and_round_trips() -> None:
    data = image()
    longer = CONF + "NET_BOOT_MAX_RETRIES=3\n# a comment\n"
    changed = embed_config(data, longer, CM4)
    assert read_config(changed, CM4) == longer
    conf = next(s for s in sections(changed) if s.name == BOOTCONF)
    assert changed[:conf.offset] == data[:conf.offset]  # the firmware is untouched
    assert embed_config(changed, CONF, CM4) == data  # shrinking erases what the longer one used
    assert stand_in_intact(changed, "2711")


def test_a_shorter_config_before_another_section_is_followed_by_padding() -> None:
    data = with_trailing_section(embed_config(image(), CONF + "HDMI_DELAY=0\n" * 20, CM4))
    shorter = embed_config(data, "BOOT_UART=1\n", CM4)
    chain = sections(shorter)
    assert [(s.magic, s.name) for s in chain] == [(SECTION_MAGIC, ""), (FILE_MAGIC, BOOTCONF), (PAD_MAGIC, ""),
                                                  (FILE_MAGIC, "pubkey.bin")]
    conf, pad, pubkey = chain[1:]
    assert pad.offset == (conf.end + 7) & ~7 and pad.end == pubkey.offset
    assert shorter[conf.end:pad.offset] == b"\xff" * (pad.offset - conf.end)
    assert read_config(shorter, CM4) == "BOOT_UART=1\n"


def test_too_big_a_config_is_refused_with_the_room_there_is() -> None:
    with pytest.raises(InputError, match=r"room for \d+.*Fix: remove comments"):
        embed_config(image(), "#" * (MAX_FILE_SIZE + 1), CM4)


@pytest.mark.parametrize("data, says", [
    (b"\xff" * 1000, "is 1000 bytes, but a cm4 (bcm2711) bootloader image is exactly 524288 bytes"),
    (bytes(IMAGE_SIZES["2712"]), "(that is the size of a 2712 image)"),
])
def test_wrong_size_names_the_expected_one(data: bytes, says: str) -> None:
    with pytest.raises(InputError) as e:
        read_config(data, CM4, "x.bin")
    assert says in str(e.value) and "Fix: use a pieeprom image from rpi-eeprom's firmware-2711 folder" in str(e.value)


def test_no_config_section_and_corruption_are_input_errors() -> None:
    bare = bytearray(b"\xff" * IMAGE_SIZES["2711"])
    bare[:8] = struct.pack(">II", SECTION_MAGIC, 100)
    with pytest.raises(InputError, match="has no bootconf.txt section"):
        read_config(bytes(bare), CM4, "bare.bin")
    corrupt = bytearray(image())
    corrupt[:4] = b"\x12\x34\x56\x78"
    with pytest.raises(InputError, match="or is corrupt: no valid section header at offset 0x0"):
        embed_config(bytes(corrupt), CONF, CM4, "corrupt.bin")
    with pytest.raises(InputError, match="no bootloader EEPROM"):
        read_config(image(), MODELS["cm3"])


def test_a_torn_image_is_no_longer_intact() -> None:
    data = bytearray(image())
    data[100_000:104_096] = b"\xff" * 4096
    assert not stand_in_intact(bytes(data), "2711")


def test_sig_matches_rpi_eeprom_digest_format(tmp_path: Path) -> None:
    data = image()
    assert sig_text(data, 1700000000) == f"{hashlib.sha256(data).hexdigest()}\nts: 1700000000\n"
    written = write_sig(tmp_path / "pieeprom.sig", data)
    assert read_sig(tmp_path / "pieeprom.sig") == written and written.timestamp > 1700000000
    check_sig(data, written)
    signed = parse_sig(f"{'A' * 64}\nts: 5\nrsa2048: beef\n")
    assert (signed.sha256, signed.timestamp, signed.rsa2048) == ("a" * 64, 5, "beef")


@pytest.mark.parametrize("text, says", [("", "does not start with a SHA-256"), ("abc\nts: 1\n", "SHA-256"),
                                        (f"{'0' * 64}\n", "no 'ts: <unix time>' line")])
def test_malformed_sigs_say_how_to_regenerate(text: str, says: str) -> None:
    with pytest.raises(InputError) as e:
        parse_sig(text)
    assert says in str(e.value) and "hil eeprom build" in str(e.value)


def test_missing_and_mismatched_sigs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="pieeprom.sig is missing: recovery.bin refuses"):
        read_sig(tmp_path / "pieeprom.sig")
    with pytest.raises(InputError, match="does not match pieeprom.bin .*recovery.bin would refuse the update"):
        check_sig(image(), parse_sig(sig_text(b"other", 1)))


def test_build_update_writes_an_image_and_its_sig(tmp_path: Path) -> None:
    sig = build_update(tmp_path / "out", image(), "BOOT_UART=1\nBOOT_ORDER=0xf14\n", CM4, timestamp=42)
    built = (tmp_path / "out" / "pieeprom.bin").read_bytes()
    assert read_config(built, CM4) == "BOOT_UART=1\nBOOT_ORDER=0xf14\n"
    assert read_sig(tmp_path / "out" / "pieeprom.sig") == sig and sig.timestamp == 42
    check_sig(built, sig)
    with pytest.raises(InputError, match="BOOT_ORDR"):
        build_update(tmp_path / "bad", image(), "BOOT_ORDR=0xf14\n", CM4)
    assert not (tmp_path / "bad").exists()
