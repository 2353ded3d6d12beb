"""`zstd`: the payload is one zstd frame of the raw bytes (quantised codes, indices, anything).

A frame must declare its content size, and that size must be the output's: a hostile frame never
chooses how much memory a decode allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from modelpress.codecs.base import Codec, register
from modelpress.errors import FormatError

__all__ = ["Zstd", "zstd_compress", "zstd_decompress"]

_LEVEL = 1  # measured: higher levels gain <1% on weights and cost 3-10x the time


def zstd_compress(data) -> bytes:
    return zstandard.ZstdCompressor(level=_LEVEL).compress(data)


def frame_size(payload) -> int:
    """The content size a zstd frame's header declares (FormatError if it is not a frame or declares none)."""
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as exc:
        raise FormatError(f"chunk payload is not a valid zstd frame ({exc})") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise FormatError("zstd frame does not declare its size")
    return declared


def zstd_decompress(payload, size: int) -> bytes:
    """The `size` bytes one frame holds; FormatError for anything else, decided before allocating."""
    declared = frame_size(payload)
    if declared != size:
        raise FormatError(f"zstd frame declares {declared} bytes, the catalogue says {size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"chunk payload is not a valid zstd frame ({exc})") from None
    if len(out) != size:
        raise FormatError(f"chunk decodes to {len(out)} bytes, the catalogue says {size}")
    return out


@register
@dataclass(frozen=True)
class Zstd(Codec):
    name = "zstd"

    def declared_size(self, payload: memoryview) -> int:
        return frame_size(payload)

    def encode(self, raw: memoryview, base: memoryview | None = None) -> bytes:
        return zstd_compress(raw)

    def decode_into(self, payload: memoryview, out: memoryview, base: memoryview | None = None) -> None:
        out[:] = zstd_decompress(payload, len(out))
