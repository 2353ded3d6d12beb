"""`planes` (float byte planes, "columnar") and `xor` (an exact delta against a base chunk).

planes: each element's bits are rotated left by one so the sign moves to bit 0 (the exponent then
fills the top byte alone), the elements' bytes are split into planes from most to least
significant, and each plane is stored zstd-coded or raw, whichever is smaller. Payload: per plane,
1 byte mode (0 raw, 1 zstd), 8 bytes little-endian length L, then L bytes. Nothing may follow the
last plane.

xor: the `planes` payload of (raw XOR base), the base being a chunk of the same size (a parent
version's). Fine-tunes that change weights slightly leave the exponent and high mantissa bits
equal, so the high planes of the XOR are mostly zero bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from modelpress.codecs.base import Codec, check_width, register
from modelpress.codecs.zstd import zstd_compress, zstd_decompress
from modelpress.errors import FormatError

__all__ = ["Planes", "Xor"]

_PLANE_HEADER = struct.Struct("<BQ")
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _rotate_left(words: np.ndarray, bits: int) -> np.ndarray:
    return (words << 1) | (words >> (bits - 1))


def _rotate_right(words: np.ndarray, bits: int) -> np.ndarray:
    return (words >> 1) | (words << (bits - 1))


def _split_planes(raw: memoryview, width: int) -> list[np.ndarray]:
    """Planes from the most significant byte down, after moving each element's sign bit to bit 0."""
    words = np.frombuffer(raw, dtype=_UINT[width])
    rotated = _rotate_left(words, 8 * width)
    as_bytes = rotated.view(np.uint8).reshape(-1, width)  # (n, width); little-endian: column 0 is the lowest byte
    return [np.ascontiguousarray(as_bytes[:, k]) for k in reversed(range(width))]


def encode_planes(raw: memoryview, width: int) -> bytes:
    if len(raw) % width:
        raise ValueError(f"{len(raw)} bytes are not a whole number of {width}-byte elements")
    parts = []
    for plane in _split_planes(raw, width):
        packed = zstd_compress(plane)
        mode, data = (1, packed) if len(packed) < plane.nbytes else (0, plane.tobytes())
        parts.append(_PLANE_HEADER.pack(mode, len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_planes(payload: memoryview, out: memoryview, width: int) -> None:
    n = len(out) // width
    if len(out) % width:
        raise FormatError(f"chunk of {len(out)} bytes is not a whole number of {width}-byte elements")
    rotated = np.empty((n, width), dtype=np.uint8)  # (n, width): the output's size, whatever the payload says
    pos = 0
    for k in reversed(range(width)):
        if pos + _PLANE_HEADER.size > len(payload):
            raise FormatError("planes payload is truncated")
        mode, length = _PLANE_HEADER.unpack_from(payload, pos)
        pos += _PLANE_HEADER.size
        if mode not in (0, 1) or pos + length > len(payload):
            raise FormatError("planes payload has an invalid plane header")
        data = payload[pos:pos + length]
        pos += length
        plane = np.frombuffer(data if mode == 0 else zstd_decompress(data, n), dtype=np.uint8)
        if plane.size != n:
            raise FormatError(f"plane holds {plane.size} bytes, expected {n}")
        rotated[:, k] = plane
    if pos != len(payload):
        raise FormatError("planes payload has trailing bytes")
    words = _rotate_right(rotated.view(_UINT[width]).reshape(-1), 8 * width)
    np.frombuffer(out, dtype=np.uint8)[:] = words.view(np.uint8)


@dataclass(frozen=True)
class _ElementCodec(Codec):
    """A codec whose one parameter is the element width (bytes)."""

    width: int

    def __post_init__(self):
        check_width(self.name, self.width)

    @classmethod
    def for_data(cls, raw: memoryview, width: int) -> "_ElementCodec":
        return cls(width)


@register
@dataclass(frozen=True)
class Planes(_ElementCodec):
    name = "planes"

    def encode(self, raw: memoryview, base: memoryview | None = None) -> bytes:
        return encode_planes(raw, self.width)

    def decode_into(self, payload: memoryview, out: memoryview, base: memoryview | None = None) -> None:
        decode_planes(payload, out, self.width)


@register
@dataclass(frozen=True)
class Xor(_ElementCodec):
    name = "xor"
    delta = True
    per_tensor = False  # a writer picks it per chunk, where a parent's chunk makes it smaller

    def encode(self, raw: memoryview, base: memoryview | None = None) -> bytes:
        if base is None or len(base) != len(raw):
            raise ValueError("the xor codec needs a base chunk of the same size")
        delta = np.bitwise_xor(np.frombuffer(raw, np.uint8), np.frombuffer(base, np.uint8))
        return encode_planes(memoryview(delta), self.width)

    def decode_into(self, payload: memoryview, out: memoryview, base: memoryview | None = None) -> None:
        if base is None:
            raise FormatError("xor chunk has no base chunk")
        if len(base) != len(out):
            raise FormatError("xor chunk's base has a different size")
        decode_planes(payload, out, self.width)
        target = np.frombuffer(out, np.uint8)
        np.bitwise_xor(target, np.frombuffer(base, np.uint8), out=target)
