"""`grid`: float32, float16 or bfloat16 values on a quantisation grid, stored as the grid's scales and codes.

Weights dequantised from a block format (a GGUF Q4_1 or Q8_0 file, a GPTQ checkpoint) are, per group of 32,
`d * q + m` computed in float32 from a float16 scale `d`, a float16 minimum `m` (0 for a symmetric grid) and
small integer codes `q`. Kept as float32 (SmolLM2 as modelpress reads it from its GGUF file), or rounded to
float16 (a dequantised fp16 checkpoint) or bfloat16 (a bf16 checkpoint, or the high plane of a float32 tensor
stored by planes: store/planes.py), they keep that shape. Generic float codecs see near-random mantissas
there (SmolLM2's high planes: 1.5x); this codec finds, per group, a (d, m, q) whose float32 value is exactly
the stored value (width 4), or rounds to exactly the stored 16-bit pattern (width 2), and stores d, m and q
instead (3x and more). A group with no such
grid (and the elements after the last whole group) is kept as it is, so any input round-trips bit for bit.
Only finite scales are used, so every rebuilt value is a finite float32 computed by correctly rounded
operations (d * q is exact; no subnormal can arise from float16 d and m), the same on every CPU.

Parameters: `width` (4: float32, 2: a 16-bit float), `bits` (4: affine codes 0..15 from a minimum; 8:
symmetric codes -127..127), `rounding` (how the stored values were made from the float32 d * q + m: "none",
float32 kept as it is, the only choice at width 4; at width 2, bfloat16 rounded "up", half up on the bit
pattern as store/planes.py rounds, or "even", to nearest even as torch casts; or float16 ("half"), to
nearest even as IEEE conversion does).

Payload, four sections in this order, each as in `planes` (1 byte mode 0 raw / 1 zstd, 8 bytes
little-endian length, the bytes): the fitted-group bitmap (one bit per whole group, least significant
first), the scales (float16 d, then float16 m for affine grids, per fitted group), the codes (one byte
per element of the fitted groups; symmetric codes as int8), and the other elements' bits (little-endian,
`width` bytes each). Decoding computes d * q + m with float32 numpy operations (a multiply, then an add: the
same operations the encoder verified) and rounds as the parameters say.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from modelpress.codecs.base import Codec, check_width, register
from modelpress.codecs.fans import NATIVE_AVAILABLE, Fans
from modelpress.codecs.planes import Planes
from modelpress.codecs.zstd import zstd_compress, zstd_decompress
from modelpress.errors import FormatError

__all__ = ["Grid", "GROUP", "fit"]

GROUP = 32
_SECTION = struct.Struct("<BQ")
_ROUNDINGS = {2: ("up", "even", "half"), 4: ("none",)}  # by width
_BITS = {2: np.uint16, 4: np.uint32}  # an element's bit pattern, by width
_M_STEPS = (0, -1, 1, -2, 2, -3, 3, -4, 4)  # float16 ulps around the first guess at m
_D_STEPS = (0, -1, 1, -2, 2)  # and around the middle of the scales every value allows
_PROBE_GROUPS = 256  # groups `for_data` tries each variant on
_WORTH = 0.5  # the share of probed groups a variant must fit to be offered


def _levels(bits: int) -> tuple[int, int]:
    """(lowest, highest) code of a grid."""
    return (0, 15) if bits == 4 else (-127, 127)


def _stored(values: np.ndarray, rounding: str) -> np.ndarray:
    """The bit patterns float32 `values` are stored as: themselves ("none"), rounded to float16 ("half", to
    nearest even as IEEE conversion does), or rounded to bfloat16."""
    if rounding == "half":
        return np.asarray(values, dtype=np.float32).astype(np.float16).view(np.uint16)
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    if rounding == "none":
        return bits
    if rounding == "up":
        return ((bits + np.uint32(0x8000)) >> np.uint32(16)).astype(np.uint16)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _widen(h: np.ndarray, rounding: str) -> np.ndarray:
    """float32 values of stored bit patterns (float16 and bfloat16 ones widened exactly)."""
    if rounding == "none":
        return h.view(np.float32)
    if rounding == "half":
        return h.view(np.float16).astype(np.float32)
    return (h.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _step(x: np.ndarray, k: int) -> np.ndarray:
    """float16 values `k` steps of the bit pattern away (a neighbour for small k, for the search only)."""
    return (x.view(np.int16) + np.int16(k)).view(np.float16) if k else x


def _reconstruct(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float32 d * q + m per group: one multiply (exact for float16 d and these codes), then one add."""
    return d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]


def _bucket(h: np.ndarray, rounding: str) -> tuple[np.ndarray, np.ndarray]:
    """The float32 interval each stored value is the rounding of (for bfloat16, either rounding; a superset at
    ties and, for float16, below powers of two); a float32 value is its own."""
    if rounding == "none":
        return h.view(np.float32), h.view(np.float32)
    if rounding == "half":
        half = h.view(np.float16).astype(np.float32)
        with np.errstate(all="ignore"):  # NaN, infinity and the largest float16 have no step up (a superset)
            reach = np.spacing(np.abs(h.view(np.float16))).astype(np.float32) / 2  # half a float16 step, exact
            return half - reach, half + reach
    centre = h.astype(np.int64) << 16
    a = (centre - 0x8000).astype(np.uint32).view(np.float32)
    b = (centre + 0x8000).astype(np.uint32).view(np.float32)
    return np.minimum(a, b), np.maximum(a, b)


def _codes(values, m32, d, lo, hi):
    """round((values - m) / d), clipped to the codes; 0 where that is not a number (in place: one temporary)."""
    scaled = values - m32
    scaled /= d.astype(np.float32)[:, None]
    np.nan_to_num(scaled, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.rint(scaled, out=scaled)
    return np.clip(scaled, lo, hi, out=scaled)


def _scale_between(values, lower, upper, m, d_guess, lo, hi):
    """A float16 d that puts every value's code inside its bucket: codes from `d_guess`, a least-squares d from
    them (the guess comes from one value's bucket; all 32 pin d down better), codes again, then the middle of
    the interval every (value, code) allows d, as float16."""
    m32 = m.astype(np.float32)[:, None]
    q = _codes(values, m32, d_guess, lo, hi)
    fitted = ((values - m32) * q).sum(1) / (q * q).sum(1)
    d_ls = np.where(np.isfinite(fitted) & (fitted != 0), fitted, d_guess.astype(np.float32))
    q = _codes(values, m32, d_ls.astype(np.float16), lo, hi)
    a, b = (lower - m32) / q, (upper - m32) / q
    usable = q != 0
    low = np.where(usable, np.minimum(a, b), -np.inf).max(1)
    high = np.where(usable, np.maximum(a, b), np.inf).min(1)
    middle = np.where(np.isfinite(low) & np.isfinite(high) & (low <= high), (low + high) / 2, d_ls)
    return middle.astype(np.float16)


def _distinct(h: np.ndarray) -> np.ndarray:
    """The number of distinct bit patterns in each group (row)."""
    ordered = np.sort(h, axis=1)
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)


def fit(h: np.ndarray, bits: int, rounding: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For (G, 32) bit patterns (uint16 for bfloat16 or, rounding "half", float16; uint32 for float32, rounding
    "none"): (fitted mask, d, m, q) of the groups some grid reproduces exactly.

    m: for an affine grid the group's minimum (its code is 0) is the rounding of m, so m is one of the float16
    values near it (tried nearest first); d: from the codes a first guess gives, the middle of the interval
    every value's bucket allows, then its float16 neighbours. Each candidate is verified on every value."""
    lo, hi = _levels(bits)
    values = _widen(h, rounding)
    lower, upper = _bucket(h, rounding)
    groups = len(h)
    ok = np.zeros(groups, dtype=bool)
    d_out = np.zeros(groups, dtype=np.float16)
    m_out = np.zeros(groups, dtype=np.float16)
    q_out = np.zeros((groups, GROUP), dtype=np.int16)
    hopeless = np.zeros(groups, dtype=bool)
    with np.errstate(all="ignore"):
        if bits == 4:
            anchor, top, span = values.min(1), values.max(1), hi - lo
        else:
            anchor, top, span = np.zeros(groups, np.float32), np.abs(values).max(1), hi
        m_first = anchor.astype(np.float16)
        for dm in (_M_STEPS if bits == 4 else (0,)):
            todo = np.flatnonzero(~ok & ~hopeless)
            if dm == _M_STEPS[1]:  # the groups the first try missed: drop those with more values than codes
                hopeless[todo] = _distinct(h[todo]) > hi - lo + 1
                todo = todo[~hopeless[todo]]
            if not len(todo):
                break
            m = _step(m_first[todo], dm)
            guess = ((top[todo] - m.astype(np.float32)) / span).astype(np.float16)
            middle = _scale_between(values[todo], lower[todo], upper[todo], m, guess, lo, hi)
            for d_try in [_step(middle, k) for k in _D_STEPS] + [guess]:
                left = np.flatnonzero(~ok[todo])
                if not len(left):
                    break
                rows, d, mm = todo[left], d_try[left], m[left]
                q = _codes(values[rows], mm.astype(np.float32)[:, None], d, lo, hi).astype(np.int16)
                good = (_stored(_reconstruct(d, mm, q), rounding) == h[rows]).all(1)
                good &= np.isfinite(d) & np.isfinite(mm)  # (a NaN's payload bits are the hardware's choice)
                hit = rows[good]
                ok[hit], d_out[hit], m_out[hit], q_out[hit] = True, d[good], mm[good], q[good]
    return ok, d_out, m_out, q_out


def _section(data: bytes) -> list[bytes]:
    packed = zstd_compress(data) if data else b""
    mode, body = (1, packed) if data and len(packed) < len(data) else (0, data)
    return [_SECTION.pack(mode, len(body)), body]


class _Sections:
    """Reads the payload's sections in order, each to exactly the size the output implies."""

    def __init__(self, payload: memoryview):
        self.payload, self.pos = payload, 0

    def next(self, size: int) -> bytes:
        if self.pos + _SECTION.size > len(self.payload):
            raise FormatError("grid payload is truncated")
        mode, length = _SECTION.unpack_from(self.payload, self.pos)
        self.pos += _SECTION.size
        if mode not in (0, 1) or self.pos + length > len(self.payload):
            raise FormatError("grid payload has an invalid section header")
        body = self.payload[self.pos:self.pos + length]
        self.pos += length
        data = bytes(body) if mode == 0 else (zstd_decompress(body, size) if size else b"")
        if len(data) != size:
            raise FormatError(f"grid section holds {len(data)} bytes, expected {size}")
        return data

    def end(self) -> None:
        if self.pos != len(self.payload):
            raise FormatError("grid payload has trailing bytes")


@register
@dataclass(frozen=True)
class Grid(Codec):
    name = "grid"
    per_tensor = False  # offered by `choose` where a sample fits a grid; asked for by name it would fit nothing
    width: int = 2
    bits: int = 4
    rounding: str = "up"

    def __post_init__(self):
        check_width(self.name, self.width, tuple(_ROUNDINGS))  # an int first: the lookups below need one
        if (type(self.bits) is not int or self.bits not in (4, 8) or not isinstance(self.rounding, str)
                or self.rounding not in _ROUNDINGS[self.width]):
            raise FormatError(f"codec 'grid' takes width 2 with rounding {_ROUNDINGS[2]} or width 4 with rounding "
                              f"{_ROUNDINGS[4]}, and bits 4 or 8; the file gives {self.width!r}, {self.bits!r}, "
                              f"{self.rounding!r}; run `modelpress store verify`")

    @staticmethod
    def probe(raw: memoryview, width: int) -> "Grid | None":
        """The variant that fits the most of the first groups, if it fits at least half of them."""
        if width not in _ROUNDINGS or len(raw) < width * GROUP:
            return None
        count = min(len(raw) // (width * GROUP), _PROBE_GROUPS)
        h = np.frombuffer(raw, dtype=_BITS[width], count=count * GROUP).reshape(count, GROUP)
        best, best_fit = None, 0.0
        for bits in (4, 8):
            for rounding in _ROUNDINGS[width]:
                share = fit(h, bits, rounding)[0].mean()
                if share > best_fit:
                    best, best_fit = Grid(width, bits, rounding), share
                if share == 1.0:  # no later variant can fit more (a failing variant's search is the slow part)
                    return best
        return best if best_fit >= _WORTH else None

    @classmethod
    def for_data(cls, raw: memoryview, width: int) -> Codec:
        """The variant that fits this chunk; a chunk of a grid tensor that lies on none (the tensor's first chunk
        chose the codec) takes the float codec instead."""
        found = cls.probe(raw, width)
        if found is not None:
            return found
        return Fans(width) if NATIVE_AVAILABLE and width in (2, 4) else Planes(width)

    def encode(self, raw: memoryview, base: memoryview | None = None) -> bytes:
        if len(raw) % self.width:
            raise ValueError(f"{len(raw)} bytes are not whole {self.width}-byte elements")
        flat = np.frombuffer(raw, dtype=_BITS[self.width])
        groups = len(flat) // GROUP
        h = flat[: groups * GROUP].reshape(groups, GROUP)
        ok, d, m, q = fit(h, self.bits, self.rounding)
        scales = [d[ok]] + ([m[ok]] if self.bits == 4 else [])
        codes = q[ok].astype(np.uint8 if self.bits == 4 else np.int8)
        rest = np.concatenate([h[~ok].reshape(-1), flat[groups * GROUP:]])
        parts = []
        for data in (np.packbits(ok, bitorder="little").tobytes(),
                     np.stack(scales, 1).astype("<f2").tobytes() if ok.any() else b"",
                     codes.tobytes(), rest.astype(f"<u{self.width}").tobytes()):
            parts += _section(data)
        return b"".join(parts)

    def decode_into(self, payload: memoryview, out: memoryview, base: memoryview | None = None) -> None:
        if len(out) % self.width:
            raise FormatError(f"grid chunk of {len(out)} bytes is not whole {self.width}-byte elements")
        n = len(out) // self.width
        groups = n // GROUP
        sections = _Sections(payload)
        ok = np.unpackbits(np.frombuffer(sections.next((groups + 7) // 8), np.uint8), count=groups,
                           bitorder="little").astype(bool)
        fitted = int(ok.sum())
        per = 2 if self.bits == 4 else 1
        scales = np.frombuffer(sections.next(2 * per * fitted), "<f2").reshape(fitted, per)
        codes = np.frombuffer(sections.next(GROUP * fitted), np.uint8 if self.bits == 4 else np.int8)
        rest = np.frombuffer(sections.next(self.width * (n - GROUP * fitted)), f"<u{self.width}")
        sections.end()
        target = np.frombuffer(out, dtype=_BITS[self.width])
        grouped = target[: groups * GROUP].reshape(groups, GROUP)
        m = scales[:, 1] if per == 2 else np.zeros(fitted, np.float16)
        if not (np.isfinite(scales).all()):
            raise FormatError("grid payload has a scale that is not a finite number")
        with np.errstate(all="ignore"):
            grouped[ok] = _stored(_reconstruct(scales[:, 0], m, codes.reshape(fitted, GROUP)), self.rounding)
        others = (groups - fitted) * GROUP
        grouped[~ok] = rest[:others].reshape(-1, GROUP)
        target[groups * GROUP:] = rest[others:]
