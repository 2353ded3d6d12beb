"""`raw` and `aligned`: the payload is the raw bytes themselves.

`aligned` also places the payload at a multiple of `align` in the chunk file (the chunk file layout
pads before it) and carries the bytes' XXH3-128, so that a load can map the payload straight from
the page cache and check it at memory speed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import xxhash

from modelpress.codecs.base import Codec, register
from modelpress.errors import FormatError

__all__ = ["Raw", "Aligned", "ALIGNMENTS", "DEFAULT_ALIGN"]

ALIGNMENTS = tuple(1 << k for k in range(6, 17))  # 64 B .. 64 KiB: cache line to the largest common page
DEFAULT_ALIGN = 4096  # what writers use: the x86-64 / common ARM page
_CHECK = re.compile(r"^[0-9a-f]{32}$")


@register
@dataclass(frozen=True)
class Raw(Codec):
    """Used where no codec saves enough to pay for its decoding."""

    name = "raw"
    verbatim = True

    def declared_size(self, payload: memoryview) -> int:
        return len(payload)

    def encode(self, raw: memoryview, base: memoryview | None = None) -> bytes:
        return bytes(raw)

    def decode_into(self, payload: memoryview, out: memoryview, base: memoryview | None = None) -> None:
        if len(payload) != len(out):
            raise FormatError(f"raw chunk holds {len(payload)} bytes, the catalogue says {len(out)}")
        out[:] = payload


@register
@dataclass(frozen=True)
class Aligned(Raw):
    """The raw bytes on an `align` boundary of the file, checked by XXH3-128 (`xxh3_128`, 32 hex digits).

    Why a second hash beside the chunk's BLAKE3 name: an aligned chunk exists to load at page-cache
    speed, and BLAKE3 (~4 GB/s per core here) alone would cost twice what safetensors' whole load
    does. XXH3-128 (~25 GB/s) catches corruption (bit rot, truncation, a wrong file) as surely; it
    is not collision resistant, so `verify` and every reader but the mapped load still check BLAKE3.
    """

    align: int
    xxh3_128: str

    name = "aligned"
    page_aligned = True

    def __post_init__(self):
        if type(self.align) is not int or self.align not in ALIGNMENTS or not isinstance(self.xxh3_128, str) \
                or not _CHECK.match(self.xxh3_128):
            raise FormatError(f"aligned codec parameters (align={self.align!r}, xxh3_128={self.xxh3_128!r}) are "
                              "invalid: align must be a power of two from 64 to 65536 and xxh3_128 32 hex digits; "
                              "run `modelpress store verify`")

    @property
    def alignment(self) -> int:
        return self.align

    @classmethod
    def for_data(cls, raw: memoryview, width: int, align: int = DEFAULT_ALIGN) -> "Aligned":
        return cls(align, xxhash.xxh3_128_hexdigest(raw))

    def check(self, raw: memoryview) -> bool:
        return xxhash.xxh3_128_hexdigest(raw) == self.xxh3_128
