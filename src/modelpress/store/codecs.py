"""Chunk codecs: small classes behind one interface, registered by the name the catalogue records.

A codec turns a chunk's raw bytes into its stored payload and back. `decode_into` writes into a
caller-owned buffer (a slice of the load arena), so decoding allocates no tensor-sized copies.
Every codec is lossless: decode(encode(x)) == x, byte for byte (property-tested).

Codecs:
- `raw`    payload = the bytes themselves (used where nothing helps).
- `aligned` payload = the bytes themselves, at a multiple of `params["align"]` in the chunk file
           (the zero padding before it belongs to the file layout, see objects.py): a load maps
           such chunks straight from the page cache instead of copying them (fastest to load).
- `zstd`   payload = one zstd frame of the bytes (quantised codes, indices, anything).
- `planes` float byte planes ("columnar"): each element's bits are rotated so the sign moves to
           the lowest bit (the exponent then fills the top byte alone), the elements' bytes are
           split into planes from most to least significant, and each plane is stored zstd-coded
           or raw, whichever is smaller. Payload: per plane, 1 byte mode (0 raw, 1 zstd),
           8 bytes little-endian length, then the data.
- `fans`   float byte planes entropy-coded with static rANS (C extension `modelpress._fcodec`):
           the exponent plane order-0 or jointly with the top two mantissa bits, lower planes
           order-0, constant or raw. Smaller and 3-4x faster to decode than `planes`; see
           `FansCodec`. Only where the extension was built (`NATIVE_AVAILABLE`).
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

from modelpress.errors import FormatError, UnsupportedError
from modelpress.store.objects import ALIGNED, alignment

try:
    from modelpress import _fcodec
except ImportError:  # installed without a C compiler: `fans` is then simply not offered
    _fcodec = None

__all__ = ["Codec", "CODECS", "codec_for", "ELEMENT_WIDTHS", "NATIVE_AVAILABLE"]

NATIVE_AVAILABLE = _fcodec is not None  # whether the `fans` codec can encode and decode here

ELEMENT_WIDTHS = (1, 2, 4, 8)
_ZSTD_LEVEL = 1  # measured: higher levels gain <1% on weights and cost 3-10x the time
_PLANE_HEADER = struct.Struct("<BQ")
_MAX_FRAME = 1 << 31


def _zstd_compress(data) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def _zstd_decompress(payload, size: int) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as exc:
        raise FormatError(f"chunk payload is not a valid zstd frame ({exc})") from None
    if declared != size:  # never let a hostile frame choose how much memory we allocate
        raise FormatError(f"zstd frame declares {declared} bytes, the catalogue says {size}")
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


class AlignedCodec(RawCodec):
    name = ALIGNED

    def encode(self, raw, params, base=None) -> bytes:
        alignment(params)
        return bytes(raw)

    def decode_into(self, payload, out, params, base=None) -> None:
        alignment(params)
        super().decode_into(payload, out, params)


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


class FansCodec(Codec):
    """`fans`: float byte planes coded with static rANS, in C (`modelpress._fcodec`).

    Params: `{"width": 1, 2 or 4}` (1 = plain bytes, order-0 coded). Each element is rotated left
    by one bit (the sign moves to bit 0, so the top byte is the exponent for fp32/bf16, or the
    exponent and three mantissa bits for fp16) and split into byte planes, most significant first.
    Plane 0 is coded order-0, or jointly with the top two bits of plane 1 as one 10-bit symbol
    (the mantissa's skew inside its exponent bucket), plane 1's other six bits then packed raw;
    every other plane order-0, constant or raw, whichever is smallest for the chunk. Frequencies
    are 12-bit; 32 interleaved 32-bit rANS lanes share one stream of 16-bit words (AVX2 runs
    eight lanes per instruction where the CPU has it; payloads are identical either way).

    Payload, version 1 (integers little-endian):

    - u8 version (1), u8 width, u32 n (elements; the decoded size is n * width);
    - `width` plane records, plane 0 first, each a u8 mode and then:
      0 raw: n bytes; 1 constant: u8 value; 2 order-0: table, stream (symbol i = byte i);
      3 joint (plane 0 of width 2 or 4 only): joint table, stream (symbol i = plane-0 byte i << 2
      | plane-1 byte i >> 6), and then plane 1 must be 4 low6: ceil(6n / 8) bytes, the low six
      bits of plane-1 byte i at bits [6i, 6i + 6) (bit j = bit j % 8 of byte j // 8; unused bits 0);
    - nothing after the last plane.

    table: u8 k (0-8: 2^k bins of 2^(8-k) consecutive byte values), a presence bitmap of
    ceil(2^k / 8) bytes (bin b = bit b % 8 of byte b // 8), then per present bin u - 1 in one byte
    (< 0x80) or two big-endian bytes with the top bit set; the u sum to exactly 2^(4+k), and each
    value of bin b has frequency u_b out of 4096 (no value may have all 4096).
    joint table: a 32-byte presence bitmap of plane-0 values; per present value t, one byte whose
    bits 0-3 (not all zero, bits 4-7 zero) mark the present symbols t << 2 | h, then each one's
    f - 1 as above; all f sum to exactly 4096, none above 2048.
    stream: u32 L, then 32 u32 initial lane states in [2^15, 2^31), then (L - 128) / 2 u16 words.
    Symbol i is decoded by lane i % 32, in order of i: the state x names slot x & 4095 of the
    symbol s with start_s <= slot < start_s + f_s (symbols in increasing order), becomes
    f_s * (x >> 12) + slot - start_s, and while below 2^15 takes the next word w: x = x << 16 | w.
    Every state must end at 2^15 with every word read.

    The decoder checks every length, table and state: a hostile payload raises `FormatError`,
    never reads or writes out of bounds, and needs no memory beyond fixed tables (~100 KiB).
    Encoding and decoding release the GIL, so threads decode chunks in parallel.
    """

    name = "fans"
    widths = (1, 2, 4)

    def _native(self, params: dict[str, Any]):
        """(the C module, the element width), or a clear error."""
        width = params.get("width")
        if width not in self.widths:
            raise FormatError(f"codec parameter width={width!r} is invalid for fans; expected one of {self.widths}")
        if _fcodec is None:
            raise UnsupportedError("the fans codec needs the C extension modelpress._fcodec, which was not built "
                                   "(no C compiler at install time); reinstall modelpress with one, or use 'planes'")
        return _fcodec, width

    def encode(self, raw, params, base=None) -> bytes:
        native, width = self._native(params)
        return native.encode(raw, width)

    def decode_into(self, payload, out, params, base=None) -> None:
        native, width = self._native(params)
        try:
            native.decode_into(payload, out, width)
        except ValueError as exc:
            raise FormatError(f"fans chunk is corrupt: {exc}") from None


CODECS: dict[str, Codec] = {c.name: c for c in (RawCodec(), AlignedCodec(), ZstdCodec(), PlanesCodec(), XorCodec(),
                                                  FansCodec())}


def codec_for(name: str) -> Codec:
    if name not in CODECS:
        raise FormatError(f"unknown codec {name!r} (known: {sorted(CODECS)}); the store was written by a newer modelpress")
    return CODECS[name]
