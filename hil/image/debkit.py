"""Guest kits from Debian packages: find a cached package, copy members out of it, pack an initramfs, and keep
the result in a folder that appears whole or not at all.

Both QEMU guests use it: the arm64 CM3 test image (:mod:`hil.image.bootable`) and the amd64 guest that puts the
virtual module behind the Linux USB stack (:mod:`hil.virtual.guest.kit`). ``scripts/fetch-guest.sh`` downloads
the packages at setup time; nothing here downloads.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from hil.errors import InfrastructureError
from hil.image.tools import need, tool_env

FETCH_FIX = "Fix: run scripts/fetch-guest.sh (with --refresh if there are several)"


def one_package(cache: Path, pattern: str, stage: str) -> Path:
    """The one cached package matching ``pattern`` in ``cache/debs``."""
    found = sorted((cache / "debs").glob(pattern))
    if len(found) != 1:
        state = "is not" if not found else f"is there {len(found)} times"
        raise InfrastructureError(f"{pattern} {state} in {cache / 'debs'}. {FETCH_FIX}", stage=stage,
                                  cache=str(cache))
    return found[0]


def kernel_release(kernel_deb: Path) -> str:
    """``6.1.0-57-amd64`` from ``linux-image-6.1.0-57-amd64_6.1.192-3_amd64.deb``."""
    return kernel_deb.name.removeprefix("linux-image-").split("_", 1)[0]


def members(deb: Path, stage: str) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Every regular file of a package's tree, with the archive to read it from (dpkg-deb reads any
    compression the package uses)."""
    proc = subprocess.Popen([need("dpkg-deb", "dpkg"), "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=tool_env())
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    yield member, tar
    except tarfile.TarError as e:
        raise InfrastructureError(f"{deb} is not a readable package ({e}). Fix: run scripts/fetch-guest.sh "
                                  "--refresh", stage=stage) from None
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


def extract(deb: Path, wanted: dict[str, Path], stage: str) -> None:
    """Copy the ``wanted`` members (``./path`` in the package -> file) out of a package."""
    left = dict(wanted)
    for member, tar in members(deb, stage):
        target = left.pop(member.name, None)
        if target is None:
            continue
        source = tar.extractfile(member)
        assert source is not None
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            shutil.copyfileobj(source, f)
        target.chmod(member.mode & 0o755)
        if not left:
            break
    if left:
        raise InfrastructureError(f"{deb.name} lacks {', '.join(sorted(left))}: not the package this guest is "
                                  "made from. Fix: run scripts/fetch-guest.sh --refresh", stage=stage)


def pack_initramfs(folder: Path, stage: str) -> bytes:
    """``folder`` as a gzipped newc cpio archive owned by root, the same bytes for the same tree."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    archive = subprocess.run([need("cpio", "cpio"), "--create", "--format=newc", "--owner=0:0", "--reproducible",
                              "--quiet"], input="\n".join(names).encode() + b"\n", capture_output=True,
                             cwd=folder, env=tool_env(), check=False)
    if archive.returncode:
        raise InfrastructureError(f"cpio could not pack the initramfs: {archive.stderr.decode(errors='replace')}",
                                  stage=stage)
    return gzip.compress(archive.stdout, compresslevel=6, mtime=0)


def cached_kit(cache: Path, prefix: str, key: str, build: Callable[[Path], None], label: str) -> Path:
    """``cache/<prefix><key>``, built by ``build(staging)`` on first use and renamed into place whole, so a
    crash or a concurrent builder never leaves half a kit; kits of the same prefix with another key are removed."""
    kit = cache / f"{prefix}{key}"
    if (kit / "complete").exists():
        return kit
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}", dir=cache))
    try:
        staging.chmod(0o755)
        build(staging)
        (staging / "complete").write_text(label)
        try:
            staging.rename(kit)
        except OSError:  # another process finished the same kit first
            if not (kit / "complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in cache.glob(f"{prefix}*"):  # from packages or an initramfs this code no longer makes
        if old != kit:
            shutil.rmtree(old, ignore_errors=True)
    return kit
