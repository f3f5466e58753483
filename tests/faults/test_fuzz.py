"""Property-based fuzzing (Hypothesis) of the two inputs a harsh user hands the framework: rig files and images.
Whatever they hold, the entry points the CLI uses answer with exit 0 or 2 (an InputError), never a traceback; an
image is accepted only when its own partition table says it fits, and ``hil flash`` of a refused one leaves a real
(virtual) module's eMMC untouched. Derandomized and without an example database, so CI tries the same cases every
run: 1,000 rig files (and 300 arbitrary texts), 1,000 image headers through open_image and 1,000 through
``hil flash``."""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hil.cli import main as hil_main
from hil.errors import InputError
from hil.flash.sources import open_image
from tests.rigfiles import merged, virtual_rig_toml

FUZZ = settings(max_examples=1000, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SECTOR = 512
MiB = 1024**2

# -- rig files -------------------------------------------------------------------------------------------------

_KEYS = {
    "": ["name", "model", "emmc", "power", "relays", "usb", "console", "timeouts", "boot", "virtual", "emmc_size"],
    "emmc": ["size"], "usb": ["port", "ports", "payload"], "console": ["baud", "device"],
    "relays": ["off_time", "pin_factory", "nwp_protect_at_rest", "power", "nrpi_boot", "eeprom_nwp"],
    "timeouts": ["rom", "login", "kernel", "flash", "mass_storage", "romm"],
    "boot": ["markers", "forbidden"], "power": ["backend", "hub", "port", "on", "off"],
    "virtual": ["speedup", "boot_engine", "state_dir", "emmc", "usb", "console", "speed"],
    "virtual.emmc": ["write_mbps", "read_mbps", "loop_device", "io_errors"],
    "virtual.usb": ["late_disk", "request_delay", "truncated_bulk", "rom_status", "first_control", "duplicate_disk",
                    "controllers", "late_dsk"],
    "virtual.console": ["unplug_after", "garbage", "garbge"],
    "boot.markers": ["kernel", "login", "kernal", "build_id", "mine"],
}
_scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.booleans(), st.text(max_size=12), st.sampled_from(["1-1.3", "64MiB", "8GB", "mock", "relay", "(", "xhci-x"]))
#: The numbers a harsh user tries first: TOML allows nan and inf, and the edges of every range.
_special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e300, 0.5, 5, -5, 2**40])
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=6)


@st.composite
def rig_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A good virtual rig with a few keys set to anything (known keys, near-misses and strangers)."""
    base = __import__("tomllib").loads(virtual_rig_toml("fuzz", draw(st.sampled_from(["cm1", "cm3", "cm4", "cm5"])),
                                                        "3-1.2", state_dir=Path("/nonexistent/fuzz")))
    for _ in range(draw(st.integers(1, 4))):
        table = draw(st.sampled_from(sorted(_KEYS)))
        key = draw(st.one_of(st.sampled_from(_KEYS[table]), st.text(min_size=1, max_size=8)))
        patch: dict[str, Any] = {key: draw(st.one_of(_special, _values))}
        for part in reversed(table.split(".") if table else []):
            patch = {part: patch}
        base = merged(base, patch)
    return base


@pytest.fixture(scope="module")
def folder() -> Any:
    with tempfile.TemporaryDirectory(prefix="cm-hil-fuzz-") as d:
        yield Path(d)


@FUZZ
@given(doc=rig_documents())
def test_rig_check_answers_every_rig_file_with_0_or_2(folder: Path, doc: dict[str, Any],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):  # not expressible as TOML (e.g. a key tomli_w refuses): nothing to test
        return
    path = folder / "rig.toml"
    path.write_text(text)
    code = hil_main(["rig", "check", "--offline", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    event(f"exit {code}")
    if code == 0:  # accepted: every number in it is finite
        _all_finite(doc)


def _all_finite(value: Any) -> None:
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for v in value.values():
            _all_finite(v)
    elif isinstance(value, list):
        for v in value:
            _all_finite(v)


@settings(FUZZ, max_examples=300)
@given(text=st.text(max_size=400))
def test_rig_check_survives_arbitrary_text(folder: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = folder / "text.toml"
    path.write_text(text)
    assert hil_main(["rig", "check", "--offline", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# -- image headers ----------------------------------------------------------------------------------------------

_ENTRY = struct.Struct("<B3sB3sII")


@st.composite
def image_heads(draw: st.DrawFn) -> tuple[int, bytes]:
    """An image size and its first sectors: an MBR of up to four entries (often plausible, sometimes not),
    maybe a protective MBR with a GPT whose CRCs are right or wrong, or random bytes."""
    sectors = draw(st.integers(1, 64 * MiB // SECTOR))
    size = sectors * SECTOR
    if draw(st.integers(0, 9)) == 0:
        return size, draw(st.binary(min_size=0, max_size=4 * SECTOR))
    head = bytearray(34 * SECTOR)
    gpt = draw(st.booleans())
    entries = 1 if gpt else draw(st.integers(0, 4))
    for i in range(entries):
        status = draw(st.sampled_from([0, 0x80, draw(st.integers(0, 255))]))
        kind = 0xEE if gpt else draw(st.sampled_from([0x0C, 0x83, 0x00, draw(st.integers(0, 255))]))
        lba = 1 if gpt else draw(st.integers(0, sectors + 8))
        count = sectors - 1 if gpt else draw(st.integers(0, sectors + 8))
        _ENTRY.pack_into(head, 446 + 16 * i, status, b"\0\0\0", kind, b"\0\0\0", lba, count)
    if draw(st.integers(0, 19)):
        head[510:512] = b"\x55\xaa"
    if gpt:
        _gpt(draw, head, sectors)
    return size, bytes(head)


def _gpt(draw: st.DrawFn, head: bytearray, sectors: int) -> None:
    count, entry_size = draw(st.sampled_from([(128, 128), (4, 128), (draw(st.integers(0, 300)), 128),
                                              (8, draw(st.sampled_from([64, 128, 256, 100])))]))
    first_usable, last_usable = 34, draw(st.integers(0, sectors + 4))
    array = bytearray(count * entry_size if count * entry_size <= 32 * SECTOR else 0)
    for i in range(min(count, draw(st.integers(0, 4)))):
        first = draw(st.integers(0, sectors))
        last = draw(st.integers(0, sectors))
        if len(array) >= (i + 1) * entry_size >= 56:
            struct.pack_into("<16s16sQQ", array, i * entry_size, draw(st.binary(min_size=16, max_size=16)),
                             bytes(16), first, last)
    head[2 * SECTOR:2 * SECTOR + len(array)] = array
    header = bytearray(92)
    struct.pack_into("<8sIIIIQQQQ16sQIII", header, 0, b"EFI PART", 0x10000, 92, 0, 0,
                     draw(st.sampled_from([1, 1, 2])), sectors - 1, first_usable, last_usable, bytes(16),
                     draw(st.sampled_from([2, 2, 1, 40])), count, entry_size,
                     zlib.crc32(bytes(array)) ^ draw(st.sampled_from([0, 0, 0, 1])))
    struct.pack_into("<I", header, 16, zlib.crc32(header) ^ draw(st.sampled_from([0, 0, 0, 1])))
    head[SECTOR:SECTOR + 92] = header


def _mbr_fits(head: bytes, size: int) -> bool:
    """The oracle, computed apart from the parsers: a signature, and every used entry inside the image."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return False
    used = [_ENTRY.unpack_from(head, 446 + 16 * i) for i in range(4)]
    used = [e for e in used if e[2] and e[5]]
    return bool(used) and all((e[4] + e[5]) * SECTOR <= size and e[4] > 0 for e in used)


@FUZZ
@given(case=image_heads())
def test_open_image_accepts_only_tables_that_fit(folder: Path, case: tuple[int, bytes]) -> None:
    size, head = case
    path = folder / "fuzz.img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(head[:size])
    try:
        open_image(path, 64 * MiB)
    except InputError as e:
        assert "Traceback" not in e.message and "/proc/" not in e.message
        event("refused")
        return
    event("accepted")
    assert _mbr_fits(head, size)
    if any(_ENTRY.unpack_from(head, 446 + 16 * i)[2] == 0xEE for i in range(4)):
        hsize = struct.unpack_from("<I", head, SECTOR + 12)[0]
        header = bytearray(head[SECTOR:SECTOR + hsize])
        header[16:20] = bytes(4)
        assert head[SECTOR:SECTOR + 8] == b"EFI PART" and zlib.crc32(header) == struct.unpack_from("<I", head,
                                                                                                   SECTOR + 16)[0]


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A virtual CM4 held in mass-storage mode (only needed by the command-line fuzzer)."""
    from tests.faults.conftest import mass_storage

    yield from mass_storage(tmp_path_factory.mktemp("fuzz"), "fault-fuzz", "43-1.3", (4, 26))


@pytest.mark.usefixtures("virtual_usb")
@FUZZ
@given(case=image_heads())
def test_hil_flash_writes_no_byte_of_a_refused_image(module: Any, folder: Path, case: tuple[int, bytes],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The whole command, against a real (virtual) module's disk: exit 2 leaves the eMMC file untouched."""
    size, head = case
    path = folder / "cli.img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(head[:size])
    before = os.stat(module.emmc).st_mtime_ns
    code = hil_main(["flash", str(path), "--rig", str(module.rig.path), "--no-usbboot", "--no-cache",
                     "--no-verify"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "/proc/" not in err
    event(f"exit {code}")
    if code == 2:
        assert os.stat(module.emmc).st_mtime_ns == before, err
    else:
        assert _mbr_fits(head, size), err
