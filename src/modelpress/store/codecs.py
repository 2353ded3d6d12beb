"""Chunk codecs: small classes behind one interface, registered by the name the catalogue records.

A codec turns a chunk's raw bytes into its stored payload and back. `decode_into` writes into a
caller-owned buffer (a slice of the load arena), so decoding allocates no tensor-sized copies.
Every codec is lossless: decode(encode(x)) == x, byte for byte (property-tested).

Codecs:
- `raw`    payload = the bytes themselves (fastest to load; used where nothing helps).
- `zstd`   payload = one zstd frame of the bytes (quantised codes, indices, anything).
- `planes` float byte planes ("columnar"): each element's bits are rotated so the sign moves to
           the lowest bit (the exponent then fills the top byte alone), the elements' bytes are
           split into planes from most to least significant, and each plane is stored zstd-coded
           or raw, whichever is smaller. Payload: per plane, 1 byte mode (0 raw, 1 zstd),
           8 bytes little-endian length, then the data.
- `xor`    exact delta against a base chunk of the same size (a parent version's chunk): the
           XOR of the two is stored with `planes` (or zstd for non-float widths). Fine-tunes that
           change weights slightly leave the exponent and high mantissa bits equal, so the XOR is
           mostly zero bytes in the high planes.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import zstandard

from modelpress.errors import FormatError

__all__ = ["Codec", "CODECS", "codec_for", "ELEMENT_WIDTHS"]

ELEMENT_WIDTHS = (1, 2, 4, 8)
_ZSTD_LEVEL = 1  # measured: higher levels gain <1% on weights and cost 3-10x the time
_PLANE_HEADER = struct.Struct("<BQ")
_MAX_FRAME = 1 << 31


def _zstd_compress(data) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def _zstd_decompress(payload, size: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"chunk payload is not a valid zstd frame ({exc})") from None
    if len(out) != size:
        raise FormatError(f"chunk decodes to {len(out)} bytes, the catalogue says {size}")
    return out


class Codec(ABC):
    name: str

    @abstractmethod
    def encode(self, raw: memoryview, params: dict[str, Any], base: Callable[[], memoryview] | None = None) -> bytes:
        """Stored payload for `raw`."""

    @abstractmethod
    def decode_into(self, payload: memoryview, out: memoryview, params: dict[str, Any],
                    base: Callable[[], memoryview] | None = None) -> None:
        """Write the raw bytes into `out` (exactly len(out) bytes)."""


class RawCodec(Codec):
    name = "raw"

    def encode(self, raw, params, base=None) -> bytes:
        return bytes(raw)

    def decode_into(self, payload, out, params, base=None) -> None:
        if len(payload) != len(out):
            raise FormatError(f"raw chunk holds {len(payload)} bytes, the catalogue says {len(out)}")
        out[:] = payload


class ZstdCodec(Codec):
    name = "zstd"

    def encode(self, raw, params, base=None) -> bytes:
        return _zstd_compress(raw)

    def decode_into(self, payload, out, params, base=None) -> None:
        out[:] = _zstd_decompress(payload, len(out))


def _width(params: dict[str, Any]) -> int:
    width = params.get("width")
    if width not in ELEMENT_WIDTHS:
        raise FormatError(f"codec parameter width={width!r} is invalid; expected one of {ELEMENT_WIDTHS}")
    return width


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _rotate_left(words: np.ndarray, bits: int) -> np.ndarray:
    return (words << 1) | (words >> (bits - 1))


def _rotate_right(words: np.ndarray, bits: int) -> np.ndarray:
    return (words >> 1) | (words << (bits - 1))


def _split_planes(raw: memoryview, width: int) -> list[np.ndarray]:
    """Planes from the most significant byte down, after moving each element's sign bit to bit 0."""
    words = np.frombuffer(raw, dtype=_UINT[width])
    rotated = _rotate_left(words, 8 * width)
    as_bytes = rotated.view(np.uint8).reshape(-1, width)  # little-endian: column 0 is the lowest byte
    return [np.ascontiguousarray(as_bytes[:, k]) for k in reversed(range(width))]


def _encode_planes(raw: memoryview, width: int) -> bytes:
    if len(raw) % width:
        raise ValueError(f"{len(raw)} bytes are not a whole number of {width}-byte elements")
    parts = []
    for plane in _split_planes(raw, width):
        packed = _zstd_compress(plane)
        mode, data = (1, packed) if len(packed) < plane.nbytes else (0, plane.tobytes())
        parts.append(_PLANE_HEADER.pack(mode, len(data)))
        parts.append(data)
    return b"".join(parts)


def _decode_planes(payload: memoryview, out: memoryview, width: int) -> None:
    n = len(out) // width
    if len(out) % width:
        raise FormatError(f"chunk of {len(out)} bytes is not a whole number of {width}-byte elements")
    rotated = np.empty((n, width), dtype=np.uint8)
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
        plane = np.frombuffer(data if mode == 0 else _zstd_decompress(data, n), dtype=np.uint8)
        if plane.size != n:
            raise FormatError(f"plane holds {plane.size} bytes, expected {n}")
        rotated[:, k] = plane
    if pos != len(payload):
        raise FormatError("planes payload has trailing bytes")
    words = _rotate_right(rotated.view(_UINT[width]).reshape(-1), 8 * width)
    np.frombuffer(out, dtype=np.uint8)[:] = words.view(np.uint8)


class PlanesCodec(Codec):
    name = "planes"

    def encode(self, raw, params, base=None) -> bytes:
        return _encode_planes(raw, _width(params))

    def decode_into(self, payload, out, params, base=None) -> None:
        _decode_planes(payload, out, _width(params))


class XorCodec(Codec):
    name = "xor"

    def encode(self, raw, params, base=None) -> bytes:
        if base is None:
            raise ValueError("the xor codec needs a base chunk")
        reference = base()
        if len(reference) != len(raw):
            raise ValueError("xor delta needs a base chunk of the same size")
        delta = np.bitwise_xor(np.frombuffer(raw, np.uint8), np.frombuffer(reference, np.uint8))
        return _encode_planes(memoryview(delta), _width(params))

    def decode_into(self, payload, out, params, base=None) -> None:
        if base is None:
            raise FormatError("xor chunk has no base chunk")
        reference = base()
        if len(reference) != len(out):
            raise FormatError("xor chunk's base has a different size")
        _decode_planes(payload, out, _width(params))
        target = np.frombuffer(out, np.uint8)
        np.bitwise_xor(target, np.frombuffer(reference, np.uint8), out=target)


CODECS: dict[str, Codec] = {c.name: c for c in (RawCodec(), ZstdCodec(), PlanesCodec(), XorCodec())}


def codec_for(name: str) -> Codec:
    if name not in CODECS:
        raise FormatError(f"unknown codec {name!r} (known: {sorted(CODECS)}); the store was written by a newer modelpress")
    return CODECS[name]
