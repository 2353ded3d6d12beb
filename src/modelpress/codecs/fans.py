"""`fans`: float byte planes entropy-coded with static rANS, in C (`modelpress.codecs._fcodec`).

Smaller and 3-4x faster to decode than `planes`. Only where the extension was built
(`NATIVE_AVAILABLE`); a reader without it fails with an error naming the fix.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from modelpress.codecs.base import Codec, check_width, register
from modelpress.errors import FormatError, LimitExceededError, UnsupportedError

try:
    from modelpress.codecs import _fcodec
except ImportError:  # installed without a C compiler: `fans` is then simply not offered
    _fcodec = None

__all__ = ["Fans", "NATIVE_AVAILABLE"]

NATIVE_AVAILABLE = _fcodec is not None  # whether the `fans` codec can encode and decode here
_HEAD = struct.Struct("<BBI")  # version, width, element count


@register
@dataclass(frozen=True)
class Fans(Codec):
    """`fans`: float byte planes coded with static rANS, in C (`modelpress.codecs._fcodec`).

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

    width: int

    name = "fans"

    def __post_init__(self):
        check_width(self.name, self.width, (1, 2, 4))

    @classmethod
    def for_data(cls, raw: memoryview, width: int) -> "Fans":
        return cls(width)

    def _native(self):
        if _fcodec is None:
            raise UnsupportedError("the fans codec needs the C extension modelpress.codecs._fcodec, which was not "
                                   "built (no C compiler at install time); reinstall modelpress with one, or use "
                                   "'planes'")
        return _fcodec

    def declared_size(self, payload: memoryview) -> int | None:
        if len(payload) < _HEAD.size:
            return None  # (the decoder says what is wrong)
        _, width, n = _HEAD.unpack_from(payload, 0)
        return n * width

    def encode(self, raw: memoryview, base: memoryview | None = None) -> bytes:
        return self._native().encode(raw, self.width)

    def decode_into(self, payload: memoryview, out: memoryview, base: memoryview | None = None) -> None:
        native = self._native()
        try:
            native.decode_into(payload, out, self.width)
        except ValueError as exc:
            raise FormatError(f"fans chunk is corrupt: {exc}") from None
        except MemoryError:  # its fixed tables (~100 KiB) could not be allocated
            raise LimitExceededError("the fans decoder's tables (~100 KiB) could not be allocated: free memory") \
                from None
