"""One decode, many writers: a flash of an image that another flash is still decoding into the cache follows that
decode instead of running its own decoder (issue 21, item 1)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from hil.errors import InfrastructureError
from hil.filehash import Sha256InBackground
from hil.flash import cache as cache_module
from hil.flash.cache import CacheWriter, ImageCache
from hil.flash.sources import open_image
from hil.flash.writer import WriteResult, write_image
from hil.image.build import BuiltImage, ImageSpec, build_image

MiB = 1024**2
EMMC = 128 * MiB

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    spec = ImageSpec(size=96 * MiB, boot_size=36 * MiB, fill=20 * MiB, compress=("xz",))
    return build_image(tmp_path_factory.mktemp("shared") / "shared.img", spec)


def write_to_file(path: Path, target: Path, cache: ImageCache, progress: object = None) -> WriteResult:
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, EMMC)
        return write_image(open_image(path, EMMC), fd, str(target), EMMC, cache=cache,
                           progress=progress)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def writing(target: Path) -> None:
    """Returns once a flash has begun writing ``target``."""
    deadline = time.monotonic() + 30
    while not (target.exists() and target.stat().st_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)


def mapped_bytes_equal(result: WriteResult, target: Path, raw: Path) -> bool:
    with open(target, "rb") as disk, open(raw, "rb") as image:
        for w in result.written:
            disk.seek(w.start)
            image.seek(w.start)
            if disk.read(w.end - w.start) != image.read(w.end - w.start):
                return False
    return True


def test_a_second_flash_follows_the_running_decode(built: BuiltImage, tmp_path: Path) -> None:
    xz = built.compressed["xz"]
    cache = ImageCache(tmp_path / "cache")
    results: dict[str, WriteResult] = {}
    errors: list[BaseException] = []
    follower = threading.Thread(target=lambda: results.update(
        second=write_to_file(xz, tmp_path / "second.img", cache)))

    def slow_leader(position: int, size: int | None, written: int, mapped: int | None, seconds: float) -> None:
        if not follower.is_alive() and "second" not in results:
            follower.start()  # joins while the first flash has decoded only its first chunk,
            writing(tmp_path / "second.img")  # and the decode waits until the second flash writes

    try:
        results["first"] = write_to_file(xz, tmp_path / "first.img", cache, slow_leader)
    except BaseException as e:  # the follower must still be joined
        errors.append(e)
    follower.join(30)
    assert not errors and not follower.is_alive()
    first, second = results["first"], results["second"]
    assert first.plan == "filesystems" and not first.from_cache  # the one decoder
    assert second.plan == "shared decode" and second.from_cache  # no decoder of its own
    assert second.written
    assert sum(w.end - w.start for w in second.written) >= sum(w.end - w.start for w in first.written)
    assert second.image_size == first.image_size == built.path.stat().st_size
    for result, target in ((first, "first.img"), (second, "second.img")):
        assert mapped_bytes_equal(result, tmp_path / target, built.path)
    assert cache.lookup(cache.key(xz)) is not None


def test_a_follower_fails_when_the_decode_it_follows_stops(built: BuiltImage, tmp_path: Path) -> None:
    xz = built.compressed["xz"]
    cache = ImageCache(tmp_path / "cache")
    key = cache.key(xz)
    leader = cache.claim(key)
    assert isinstance(leader, CacheWriter)  # this one decodes
    leader.write(0, memoryview(bytes(8 * MiB)))
    stopper = threading.Thread(target=lambda: (writing(tmp_path / "follower.img"), leader.abort()))
    stopper.start()
    with pytest.raises(InfrastructureError, match="stopped before the end"):
        write_to_file(xz, tmp_path / "follower.img", cache)
    stopper.join()


def test_a_file_is_hashed_once_when_the_summary_and_the_writer_ask_at_once(
        built: BuiltImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hil flash`` hashes the image in the background for its summary while the writer needs the same SHA-256 as
    the cache key: the second asker waits for the first hash instead of reading the file again."""
    xz = built.compressed["xz"]
    calls: list[Path] = []
    started = threading.Event()

    def slow_sha256(path: Path) -> str:
        calls.append(path)
        started.set()
        time.sleep(0.3)  # long enough for the writer's call to arrive while this hash is under way
        return hashlib.sha256(path.read_bytes()).hexdigest()

    monkeypatch.setattr(cache_module, "sha256_file", slow_sha256)
    cache = ImageCache(tmp_path / "cache")
    summary = Sha256InBackground(xz, cache.key)
    assert started.wait(10)
    writer_key = cache.key(xz)  # the writer's call, while the summary's hash runs
    assert summary.result() == writer_key == hashlib.sha256(xz.read_bytes()).hexdigest()
    assert calls == [xz]
    assert ImageCache(tmp_path / "cache").key(xz) == writer_key and calls == [xz]  # remembered for the next flash
