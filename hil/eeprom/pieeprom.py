"""The pieeprom image container: find, read and replace the ``bootconf.txt`` inside a bootloader image.

An image is exactly the size of the module's SPI flash (512 KiB on BCM2711, 2 MiB on BCM2712) and is a chain
of sections, each an 8-byte big-endian header (magic, length of what follows) starting on an 8-byte
boundary. Every magic matches 0x55aaf00f under the mask 0xfffff00f; 0x55aaf11f marks a modifiable file,
whose 12-byte NUL-padded name and a reserved 32-bit word come before its data, and 0x55aafeef marks padding.
An all-zero or all-ones header ends the chain. Modifiable files live in their own 4 KiB erase blocks and the
last 4 KiB of the flash is the bootloader's scratch space. This is the layout Raspberry Pi's
``rpi-eeprom-config`` reads and writes (format learnt from its public source; this is our own code).

Replacing the config keeps everything else byte for byte, as ``rpi-eeprom-config --config`` does: it
rewrites the ``bootconf.txt`` of the updatable window (after the 64 KiB read-only part, before 0x107000 where
a 2 MiB A/B image's partition B begins), then erased (0xff) bytes to the next 8-byte boundary, then, unless
``bootconf.txt`` ends the chain, a padding header (zero-length when exactly 8 bytes are left) up to the next
section that is not padding, or else to the end of that window. So a 2712 image keeps the padding header at
0x107000 that marks partition B, and later sections such as ``pubkey.bin`` stay in the chain.

Raspberry Pi's images are not ours to ship: :func:`stand_in_image` builds one with the same container and a
stand-in "firmware" section that the virtual module can run (it carries the version strings a real image
carries, and a digest so that a half-written image is detectably broken).
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
from dataclasses import dataclass

from hil.errors import InputError
from hil.models import ModuleModel

STAGE = "eeprom.image"
IMAGE_SIZES = {"2711": 512 * 1024, "2712": 2 * 1024 * 1024}
SECTION_MAGIC = 0x55AAF00F
MAGIC_MASK = 0xFFFFF00F
FILE_MAGIC = 0x55AAF11F
PAD_MAGIC = 0x55AAFEEF
BOOTCONF = "bootconf.txt"
ERASE_BLOCK = 4096
READ_ONLY_SIZE = 64 * 1024  # an A/B image: the read-only part, partition A, an empty partition B, journals
PARTITION_END = READ_ONLY_SIZE + 988 * 1024  # 0x107000: the end of the window a config update may touch
_HEADER = struct.Struct(">II")
_NAME_LEN = 12
_FILE_HEADER = _HEADER.size + _NAME_LEN
_FILE_DATA = _FILE_HEADER + 4  # then a reserved 32-bit word, then the data
MAX_FILE_SIZE = ERASE_BLOCK - _FILE_HEADER  # rpi-eeprom-config's limit: 4076 bytes

_STAND_IN = b"CM-HIL PIEEPROM\0"
_STAND_IN_HEAD = struct.Struct(">16s4s32s")  # magic, chip, sha256 of the rest of the section
_BANNER = re.compile(rb"VERSION:([0-9a-f]{8}) DATE: (\d{4}/\d\d/\d\d TIME: \d\d:\d\d:\d\d)")
_TIMESTAMP = re.compile(rb"BUILD_TIMESTAMP=(\d+)")


@dataclass(frozen=True)
class Section:
    magic: int
    offset: int
    length: int  # bytes after the 8-byte header
    name: str = ""  # modifiable files only

    @property
    def end(self) -> int:
        return self.offset + _HEADER.size + self.length

    @property
    def next(self) -> int:
        return (self.end + 7) & ~7


@dataclass(frozen=True)
class ImageFacts:
    """What identifies a bootloader build, found in the image as ``rpi-eeprom-update`` finds it (strings)."""

    build_timestamp: int | None
    version: str | None  # the git hash the UART banner prints after VERSION:
    date: str | None
    stand_in: bool


def check_size(image: bytes, model: ModuleModel, source: object = "pieeprom.bin") -> None:
    """The image must fill the module's SPI flash exactly."""
    want = IMAGE_SIZES.get(model.chip_dir)
    if want is None:
        raise InputError(f"a {model.name} has no bootloader EEPROM. Fix: use a cm4 or cm5 rig", stage=STAGE)
    if len(image) != want:
        other = next((chip for chip, size in IMAGE_SIZES.items() if size == len(image)), None)
        hint = f" (that is the size of a {other} image)" if other else ""
        raise InputError(f"{source} is {len(image)} bytes{hint}, but a {model.name} ({model.chip}) bootloader image "
                         f"is exactly {want} bytes. Fix: use a pieeprom image from rpi-eeprom's "
                         f"firmware-{model.chip_dir} folder", stage=STAGE, size=len(image))


def sections(image: bytes, source: object = "pieeprom.bin") -> list[Section]:
    """The section chain; a header that is not one means the image is not a bootloader image (or corrupt)."""
    found: list[Section] = []
    offset = 0
    while offset + _HEADER.size <= len(image):
        magic, length = _HEADER.unpack_from(image, offset)
        if magic in (0, 0xFFFFFFFF):
            break
        if magic & MAGIC_MASK != SECTION_MAGIC or offset + _HEADER.size + length > len(image):
            raise InputError(f"{source} is not a bootloader image, or is corrupt: no valid section header at offset "
                             f"0x{offset:x} (magic 0x{magic:08x}). Fix: use an unmodified pieeprom image",
                             stage=STAGE, offset=offset)
        name = ""
        if magic == FILE_MAGIC:
            name = image[offset + _HEADER.size:offset + _HEADER.size + _NAME_LEN].rstrip(b"\0").decode("ascii",
                                                                                                  "replace")
        found.append(Section(magic, offset, length, name))
        offset = found[-1].next
    return found


def _config_section(image: bytes, model: ModuleModel, source: object,
                    window: tuple[int, int] = (0, 1 << 32)) -> tuple[list[Section], int]:
    """The chain and the index of the first ``bootconf.txt`` whose header lies in ``window``."""
    check_size(image, model, source)
    chain = sections(image, source)
    for index, section in enumerate(chain):
        if section.magic == FILE_MAGIC and section.name == BOOTCONF and window[0] <= section.offset < window[1]:
            return chain, index
    where = "" if window[0] == 0 else f" between 0x{window[0]:x} and 0x{window[1]:x} (where an update writes it)"
    raise InputError(f"{source} has no {BOOTCONF} section{where}, so it cannot carry a boot.conf. Fix: start "
                     "from an official pieeprom image (every release since 2019 has one)", stage=STAGE)


def read_config(image: bytes, model: ModuleModel, source: object = "pieeprom.bin") -> str:
    """The boot.conf stored in the image."""
    chain, index = _config_section(image, model, source)
    section = chain[index]
    data = image[section.offset + _FILE_DATA:section.end]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{source}: its {BOOTCONF} is not text. Fix: use an unmodified pieeprom image",
                         stage=STAGE) from None


def embed_config(image: bytes, text: str, model: ModuleModel, source: object = "pieeprom.bin") -> bytes:
    """A copy of ``image`` carrying ``text`` as its boot.conf (the rest unchanged)."""
    chain, index = _config_section(image, model, source, (READ_ONLY_SIZE, PARTITION_END))
    section = chain[index]
    data = text.encode("utf-8")
    following = chain[index + 1:]
    window_end = min(len(image) - ERASE_BLOCK, PARTITION_END)
    limit = next((s.offset for s in following if s.magic != PAD_MAGIC), window_end)
    end = section.offset + _FILE_DATA + len(data)
    if len(data) > MAX_FILE_SIZE or end > limit:
        room = min(MAX_FILE_SIZE, limit - section.offset - _FILE_DATA)
        raise InputError(f"the boot.conf is {len(data)} bytes; {source} has room for {room}. Fix: remove comments "
                         "or settings", stage=STAGE, size=len(data))
    out = bytearray(image)
    _HEADER.pack_into(out, section.offset, FILE_MAGIC, len(data) + _NAME_LEN + 4)
    out[section.offset + _FILE_DATA:end] = data
    aligned = (end + 7) & ~7
    out[end:aligned] = b"\xff" * (aligned - end)
    if following and limit - aligned >= _HEADER.size:  # bridge the gap to what follows, even with an empty pad
        _HEADER.pack_into(out, aligned, PAD_MAGIC, limit - aligned - _HEADER.size)
        aligned += _HEADER.size
    out[aligned:limit] = b"\xff" * (limit - aligned)
    return bytes(out)


def image_facts(image: bytes) -> ImageFacts:
    """The build the image holds: ``BUILD_TIMESTAMP=`` (what rpi-eeprom-update reads) and the banner's version."""
    stamp = _TIMESTAMP.search(image)
    banner = _BANNER.search(image)
    return ImageFacts(int(stamp.group(1)) if stamp else None,
                      banner.group(1).decode() if banner else None,
                      banner.group(2).decode() if banner else None,
                      image[_HEADER.size:_HEADER.size + len(_STAND_IN)] == _STAND_IN)


def stand_in_image(model: ModuleModel, config: str, *, version: str, date: str, timestamp: int) -> bytes:
    """A bootloader image with the real container layout, a stand-in firmware section and ``config``.

    ``date`` is as the banner prints it (``2024/04/15 TIME: 13:12:14``)."""
    size = IMAGE_SIZES[model.chip_dir]
    window_end = min(size, PARTITION_END)
    config_at = window_end - 2 * ERASE_BLOCK  # its own erase block, inside the window an update may touch
    banner = f"VERSION:{version} DATE: {date} BUILD_TIMESTAMP={timestamp}\0".encode()
    body_size = config_at - _HEADER.size - _STAND_IN_HEAD.size
    body = banner + random.Random(f"pieeprom/{model.chip_dir}/{version}").randbytes(body_size - len(banner))
    image = bytearray(b"\xff" * size)
    _HEADER.pack_into(image, 0, SECTION_MAGIC, config_at - _HEADER.size)
    _STAND_IN_HEAD.pack_into(image, _HEADER.size, _STAND_IN, model.chip_dir.encode(), hashlib.sha256(body).digest())
    image[_HEADER.size + _STAND_IN_HEAD.size:config_at] = body
    _HEADER.pack_into(image, config_at, FILE_MAGIC, _NAME_LEN + 4)
    image[config_at + _HEADER.size:config_at + _HEADER.size + _NAME_LEN] = BOOTCONF.encode().ljust(_NAME_LEN, b"\0")
    image[config_at + _HEADER.size + _NAME_LEN:config_at + _FILE_DATA] = bytes(4)
    if window_end < size:  # a 2 MiB A/B image: partition A ends in padding, partition B is one padding section
        _HEADER.pack_into(image, config_at + _FILE_DATA, PAD_MAGIC, window_end - config_at - _FILE_DATA - _HEADER.size)
        _HEADER.pack_into(image, window_end, PAD_MAGIC, size - 2 * ERASE_BLOCK - window_end - _HEADER.size)
    return embed_config(bytes(image), config, model, "stand-in image")


def stand_in_intact(image: bytes, chip: str) -> bool:
    """A stand-in image for ``chip`` whose firmware section is whole (a torn write breaks its digest)."""
    if len(image) != IMAGE_SIZES.get(chip) or len(image) < _HEADER.size + _STAND_IN_HEAD.size:
        return False
    magic, length = _HEADER.unpack_from(image, 0)
    if magic != SECTION_MAGIC or _HEADER.size + length > len(image):
        return False
    tag, owner, digest = _STAND_IN_HEAD.unpack_from(image, _HEADER.size)
    body = image[_HEADER.size + _STAND_IN_HEAD.size:_HEADER.size + length]
    return tag == _STAND_IN and owner == chip.encode() and hashlib.sha256(body).digest() == digest
