"""The .bmap's per-range checksums, checked against the image's bytes as they stream past the writer (as
bmaptool does): a .bmap made for another image, or an image changed since, is the user's input to fix (exit 2),
not a faulty module. Ranges arrive in order; a range spanning chunks is hashed piece by piece."""

from __future__ import annotations

import hashlib

from hil.errors import InputError
from hil.flash.ranges import Bmap

STAGE = "flash.bmap"


class StreamChecksums:
    def __init__(self, bmap: Bmap):
        assert bmap.checksum_type is not None
        self.bmap = bmap
        self._ranges = list(bmap.checksums)
        self._next = 0  # index of the first range not yet complete
        self._kind: str = bmap.checksum_type
        self._hash = hashlib.new(self._kind)

    def feed(self, offset: int, data: memoryview) -> None:
        """Take the image's bytes [offset, offset + len(data)); raise InputError at the first range that
        is complete and does not match."""
        end = offset + len(data)
        while self._next < len(self._ranges):
            start, stop, digest = self._ranges[self._next]
            if start >= end:
                return
            s, e = max(start, offset), min(stop, end)
            if s < e:
                self._hash.update(data[s - offset:e - offset])
            if stop > end:
                return
            if self._hash.hexdigest() != digest:
                raise InputError(f"image bytes {start}-{stop} do not match their {self.bmap.checksum_type} in "
                                 f"{self.bmap.path}: the .bmap belongs to another image, or the image was changed "
                                 "since. Fix: use the image's own .bmap (or remove it), or fetch the image again",
                                 stage=STAGE, bmap=str(self.bmap.path), offset=start)
            self._next += 1
            self._hash = hashlib.new(self._kind)

    def finish(self) -> None:
        """Every listed range must have gone by: an image shorter than its .bmap says is bad input too."""
        if self._next < len(self._ranges):
            start = self._ranges[self._next][0]
            raise InputError(f"the image ended before byte {start}, which {self.bmap.path} lists as data. Fix: use "
                             "the image's own .bmap, or fetch the image again", stage=STAGE, offset=start)
