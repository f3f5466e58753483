"""Compressed copies and .bmap files of a raw image, and deliberately broken ones for negative tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from hil.errors import InfrastructureError
from hil.image.tools import need, run, tool_env

#: suffix -> (command, Debian package). xz and zstd run threaded: ``xz -T0`` writes independent
#: blocks that a reader can decode on all cores (see docs/flash-performance.md).
FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "xz": (("xz", "-T0", "-c"), "xz-utils"),
    "gz": (("gzip", "-c", "-n"), "gzip"),
    "zst": (("zstd", "-T0", "-q", "-c"), "zstd"),
    "bz2": (("bzip2", "-c"), "bzip2"),
}
_STAGE = "image.compress"


def output_path(raw: Path, suffix: str) -> Path:
    """Where an output derived from ``raw`` goes: next to it, ``x.img`` -> ``x.img.xz``."""
    return raw.with_name(f"{raw.name}.{suffix}")


def compress(raw: Path, formats: Iterable[str]) -> dict[str, Path]:
    """Write ``raw.<fmt>`` for each format, all at once (they are independent), and return them by format."""
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}  # format -> (compressor, output)
    try:
        for fmt in formats:
            argv, package = FORMATS[fmt]
            out = output_path(raw, fmt)
            with open(raw, "rb") as src, open(out, "wb") as dst:
                procs[fmt] = (subprocess.Popen([need(argv[0], package), *argv[1:]], stdin=src, stdout=dst,
                                               stderr=subprocess.PIPE, env=tool_env()), out)
        for fmt, (proc, out) in procs.items():
            _, err = proc.communicate()
            if proc.returncode:
                raise InfrastructureError(f"{FORMATS[fmt][0][0]} failed on {out}: {err.decode().strip()}",
                                          stage=_STAGE)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {fmt: out for fmt, (_, out) in procs.items()}


def write_bmap(raw: Path) -> Path:
    """``raw.bmap`` from Debian's bmaptool: the mapped (non-hole) ranges, with their checksums."""
    out = output_path(raw, "bmap")
    run(["bmaptool", "create", "-o", out, raw], package="bmap-tools", stage=_STAGE)
    return out


def truncate_stream(path: Path) -> None:
    """Cut a compressed file in half, so the stream ends before its end marker and checksums."""
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)


def corrupt_stream(path: Path) -> None:
    """Invert 16 bytes in the middle of a compressed file, so decompression fails its check."""
    with open(path, "r+b") as f:
        middle = f.seek(0, 2) // 2
        f.seek(middle)
        chunk = f.read(16)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in chunk))
