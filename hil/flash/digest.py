"""The checksum that verification compares: what was written against what is read back.

It only has to catch a disk that returns other bytes than it was given, not an adversary, so it is XXH3-128
(the xxhash library): about 0.02 CPU seconds per GiB here, where SHA-256 costs 0.6 with SHA instructions and
about ten times that on a Raspberry Pi 4's Cortex-A72, which has none. Verifying 8 rigs' flashes on such a
controller would otherwise be bound by hashing, not by the eMMC. SHA-256 stays where a person reads the value:
an image's identity in the report and ``--expect-sha256``.
"""

from __future__ import annotations

import xxhash

#: how the report names the comparison
NAME = "XXH3-128 of each written range"


def piece_digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)
