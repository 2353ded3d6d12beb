"""llama.cpp's weight blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K), packed and unpacked by us in numpy.

The layouts (ggml-common.h; every multi-byte field little-endian, blocks run along a row, a row is
whole blocks):

    Q8_0  32 weights, 34 bytes:  d f16 | qs i8[32]                      w = d * qs[j]
    Q4_0  32 weights, 18 bytes:  d f16 | qs u8[16]                      w = d * (q[j] - 8)
    Q4_1  32 weights, 20 bytes:  d f16 | m f16 | qs u8[16]              w = d * q[j] + m
    Q5_0  32 weights, 22 bytes:  d f16 | qh u32 | qs u8[16]             w = d * (q[j] - 16)
    Q5_1  32 weights, 24 bytes:  d f16 | m f16 | qh u32 | qs u8[16]     w = d * q[j] + m
          (Q4_*/Q5_*: qs[j] holds the low 4 bits of q[j] in its low nibble and of q[j + 16] in its high nibble;
          Q5_*: bit j of qh is bit 4 of q[j])
    Q6_K  256 weights, 210 bytes: ql u8[128] | qh u8[64] | sc i8[16] | d f16
          w = d * sc[j // 16] * (q[j] - 32), q[j] 6 bits; with j = 128 h + t (h in 0..1, t in 0..127):
          low 4 bits: nibble t // 64 of ql[64 h + t % 64]; high 2 bits: bits 2 (t // 32) of qh[32 h + t % 32]
    Q4_K  256 weights, 144 bytes: d f16 | dmin f16 | scales u8[12] | qs u8[128]
          w = (d * sc[s]) * q[j] - dmin * m[s], s = j // 32 (8 sub-blocks), q 4 bits, sc and m 6 bits;
          q: with j = 64 h + t, nibble t // 32 of qs[32 h + t % 32]; sc and m (get_scale_min_k4): for s < 4
          sc[s] = scales[s] & 63, m[s] = scales[s + 4] & 63; for s >= 4 the low 4 bits are the nibbles of
          scales[s + 4] (sc low, m high) and the high 2 bits the top bits of scales[s - 4] (sc) and scales[s] (m)

The K-quants (Q4_K, Q6_K) need rows of whole 256-weight blocks, and their weights are a float16 super-scale
times a 6- or 8-bit integer sub-scale: a product that is not a float16 in general, so no modelpress grid
(float16 scale per group) holds them; they are written by requantising and read back dequantised.

modelpress's symmetric codes are unsigned with midpoint 2^(b-1): w = (c - 8) * s at 4 bits is Q4_0's
rule with d = s, c = q; at 8 bits w = (c - 128) * s is Q8_0's with qs = c - 128. So those grids move
between the formats with their codes and scales unchanged (`exports/gguf.py`, `formats/gguf_import.py`).

`quantise_*` put float weights on a block grid (round to nearest; used for tensors whose own grid is
not a block format). `dequantise` is the plain formula above, for any of these types.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "BYTES", "K_FALLBACK", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "pack_q8_0",
           "unpack_q8_0", "pack_q4_0", "unpack_q4_0", "pack_q4_1", "unpack_q4_1", "pack_q5_0", "unpack_q5_0",
           "pack_q5_1", "unpack_q5_1", "pack_q4_k", "unpack_q4_k", "pack_q6_k", "unpack_q6_k", "quantise",
           "dequantise"]

# ggml type ids (ggml.h), the only ones this module packs
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K = 2, 3, 6, 7, 8, 12, 14
BLOCK = {Q8_0: 32, Q4_0: 32, Q4_1: 32, Q5_0: 32, Q5_1: 32, Q4_K: 256, Q6_K: 256}  # weights per block
BYTES = {Q8_0: 34, Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q4_K: 144, Q6_K: 210}  # bytes per block
# what llama.cpp's quantiser writes instead of a K-quant for a tensor whose rows are not whole 256-blocks
# (llama-quant.cpp: Q4_K -> Q5_0, Q6_K -> Q8_0)
K_FALLBACK = {Q4_K: Q5_0, Q6_K: Q8_0}


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) -> (n, 2) uint8: float16 little-endian."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n,) float16."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes 0..15 -> (n, 16) bytes: q[j] low, q[j + 16] high."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _unnibble(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.uint8)  # (n, 32)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q (n, 32) int8, d (n,) float16 -> (n, 34) uint8 blocks."""
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def unpack_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 34) uint8 -> (q (n, 32) int8, d (n,) float16)."""
    return np.ascontiguousarray(blocks[:, 2:]).view(np.int8), _f16(blocks[:, :2])


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q (n, 32) codes 0..15 (8 is zero), d (n,) float16 -> (n, 18) uint8 blocks."""
    return np.concatenate([_f16_bytes(d), _nibbles(q.astype(np.uint8))], axis=1)


def unpack_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 18) uint8 -> (q (n, 32) uint8 0..15, d (n,) float16)."""
    return _unnibble(blocks[:, 2:]), _f16(blocks[:, :2])


def pack_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q (n, 32) codes 0..15, d and m (n,) float16 -> (n, 20) uint8 blocks."""
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q.astype(np.uint8))], axis=1)


def unpack_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 20) uint8 -> (q (n, 32) uint8, d (n,) float16, m (n,) float16)."""
    return _unnibble(blocks[:, 4:]), _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> (n, 4) bytes: bit j of the little-endian u32 is bit 4 of q[j]."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(axis=1, dtype=np.uint32).astype("<u4")).view(np.uint8).reshape(-1, 4)


def _with_high_bits(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    word = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    high = ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (n, 32)
    return _unnibble(qs) | (high << 4)


def pack_q5_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q (n, 32) codes 0..31 (16 is zero), d (n,) float16 -> (n, 22) uint8 blocks."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _high_bits(q), _nibbles(q & 0x0F)], axis=1)


def unpack_q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 22) uint8 -> (q (n, 32) uint8 0..31, d (n,) float16)."""
    return _with_high_bits(blocks[:, 2:6], blocks[:, 6:]), _f16(blocks[:, :2])


def pack_q5_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q (n, 32) codes 0..31, d and m (n,) float16 -> (n, 24) uint8 blocks."""
    q = q.astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _high_bits(q), _nibbles(q & 0x0F)], axis=1)


def unpack_q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 24) uint8 -> (q (n, 32) uint8 0..31, d (n,) float16, m (n,) float16)."""
    return _with_high_bits(blocks[:, 4:8], blocks[:, 8:]), _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def pack_q6_k(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q (n, 256) codes 0..63 (32 is zero), sc (n, 16) int8, d (n,) float16 -> (n, 210) uint8 blocks."""
    n = q.shape[0]
    q = q.astype(np.uint8).reshape(n, 2, 128)
    lo, hi = (q & 0x0F).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1).astype(np.uint8)


def unpack_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 210) uint8 -> (q (n, 256) uint8 0..63, sc (n, 16) int8, d (n,) float16)."""
    n = blocks.shape[0]
    ql, qh = blocks[:, :128].reshape(n, 2, 1, 64), blocks[:, 128:192].reshape(n, 2, 1, 32)
    lo = (ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F  # (n, 2, 2, 64)
    hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03  # (n, 2, 4, 32)
    q = lo.reshape(n, 2, 128) | (hi.reshape(n, 2, 128) << 4)
    return q.reshape(n, 256).astype(np.uint8), np.ascontiguousarray(blocks[:, 192:208]).view(np.int8), \
        _f16(blocks[:, 208:210])


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sc, m (n, 8) 6-bit -> (n, 12) bytes, get_scale_min_k4's packing."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, :4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _k4_unscales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) bytes -> sc, m (n, 8) uint8 0..63."""
    sc = np.concatenate([b[:, :4] & 63, (b[:, 8:] & 0x0F) | ((b[:, :4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.uint8), m.astype(np.uint8)


def pack_q4_k(q: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """q (n, 256) codes 0..15, sc and m (n, 8) 0..63, d and dmin (n,) float16 -> (n, 144) uint8 blocks."""
    n = q.shape[0]
    parts = q.astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (parts[:, :, 0] | (parts[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k4_scales(sc, m), qs], axis=1).astype(np.uint8)


def unpack_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n, 144) uint8 -> (q (n, 256) uint8 0..15, sc (n, 8), m (n, 8) uint8 0..63, d (n,), dmin (n,) float16)."""
    n = blocks.shape[0]
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F  # (n, 4, 2, 32)
    sc, m = _k4_unscales(blocks[:, 4:16])
    return q.reshape(n, 256).astype(np.uint8), sc, m, _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def dequantise(blocks: np.ndarray, ggml_type: int) -> np.ndarray:
    """(n, BYTES) uint8 -> (n, BLOCK) float32 by the formula of the type (module docstring)."""
    if ggml_type == Q8_0:
        q, d = unpack_q8_0(blocks)
        return d.astype(np.float32)[:, None] * q.astype(np.float32)
    if ggml_type == Q4_0:
        q, d = unpack_q4_0(blocks)
        return d.astype(np.float32)[:, None] * (q.astype(np.float32) - 8)
    if ggml_type == Q4_1:
        q, d, m = unpack_q4_1(blocks)
        return d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]
    if ggml_type == Q5_0:
        q, d = unpack_q5_0(blocks)
        return d.astype(np.float32)[:, None] * (q.astype(np.float32) - 16)
    if ggml_type == Q5_1:
        q, d, m = unpack_q5_1(blocks)
        return d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]
    if ggml_type == Q4_K:
        q, sc, m, d, dmin = unpack_q4_k(blocks)
        step = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # (n, 8), float32 as ggml computes it
        low = dmin.astype(np.float32)[:, None] * m.astype(np.float32)
        return (np.repeat(step, 32, axis=1) * q.astype(np.float32) - np.repeat(low, 32, axis=1)).astype(np.float32)
    if ggml_type == Q6_K:
        q, sc, d = unpack_q6_k(blocks)
        step = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # (n, 16)
        return (np.repeat(step, 16, axis=1) * (q.astype(np.float32) - 32)).astype(np.float32)
    raise ValueError(f"ggml type {ggml_type} is not one of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K")


def _f16_up(x: np.ndarray) -> np.ndarray:
    """The float16 at or above each x >= 0: a K-quant's super-scale, so the largest integer sub-scale it needs stays
    within range (rounded down, a small or subnormal d would clip the largest sub-block's steps)."""
    d = x.astype(np.float16)
    return np.where(d.astype(np.float32) < x, np.nextafter(d, np.float16(np.inf)), d).astype(np.float16)


def _safe_div(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, 0.0, x / np.where(d == 0, 1, d))


def quantise(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """(n, BLOCK) float -> (n, BYTES) uint8 blocks, round to nearest on scales from each block's range.

    Q8_0: d = amax / 127. Q4_0 (Q5_0): d = -x / 8 (16) for the x of largest magnitude (as llama.cpp: every level).
    Q4_1 (Q5_1): d = (max - min) / 15 (31), m = min. Q6_K: each 16-wide part's step amax / 31, stored as int8 multiples
    of d = max step / 127 (float16 rounded up). Q4_K: `_quantise_q4_k`. Codes are rounded against the float16 (and
    int8) scales actually stored."""
    w = np.asarray(w, dtype=np.float32)
    if ggml_type == Q8_0:
        d = (np.abs(w).max(axis=1) / 127).astype(np.float16)
        q = np.clip(np.rint(_safe_div(w, d.astype(np.float32)[:, None])), -127, 127)
        return pack_q8_0(q.astype(np.int8), d)
    if ggml_type in (Q4_0, Q5_0):
        half = 8 if ggml_type == Q4_0 else 16
        peak = np.take_along_axis(w, np.abs(w).argmax(axis=1)[:, None], axis=1)[:, 0]
        d = (peak / -half).astype(np.float16)
        q = np.clip(np.rint(_safe_div(w, d.astype(np.float32)[:, None])) + half, 0, 2 * half - 1).astype(np.uint8)
        return pack_q4_0(q, d) if ggml_type == Q4_0 else pack_q5_0(q, d)
    if ggml_type in (Q4_1, Q5_1):
        top = 15 if ggml_type == Q4_1 else 31
        lo, hi = w.min(axis=1), w.max(axis=1)
        d, m = ((hi - lo) / top).astype(np.float16), lo.astype(np.float16)
        q = np.clip(np.rint(_safe_div(w - m.astype(np.float32)[:, None], d.astype(np.float32)[:, None])), 0, top)
        return pack_q4_1(q.astype(np.uint8), d, m) if ggml_type == Q4_1 else pack_q5_1(q.astype(np.uint8), d, m)
    if ggml_type == Q4_K:
        return _quantise_q4_k(w)
    if ggml_type == Q6_K:
        n = w.shape[0]
        parts = w.reshape(n, 16, 16)
        step = np.abs(parts).max(axis=2) / 31  # (n, 16)
        d = _f16_up(step.max(axis=1) / 127)
        sc = np.clip(np.rint(_safe_div(step, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
        eff = (d.astype(np.float32)[:, None] * sc.astype(np.float32))[:, :, None]  # (n, 16, 1)
        q = np.clip(np.rint(_safe_div(parts, eff)), -32, 31) + 32
        return pack_q6_k(q.reshape(n, 256).astype(np.uint8), sc, d)
    raise ValueError(f"ggml type {ggml_type} is not one of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K")


def _quantise_q4_k(w: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> Q4_K blocks: each 32-wide sub-block's range [min(0, lo), hi] on 16 levels (step
    (hi - min) / 15, offset -min, as llama.cpp keeps every offset <= 0), the steps and offsets as 6-bit multiples
    of d = max step / 63 and dmin = max offset / 63 (float16, rounded up), then the codes rounded against what is
    stored."""
    n = w.shape[0]
    parts = w.reshape(n, 8, 32)
    low = np.minimum(parts.min(axis=2), 0.0)  # (n, 8), <= 0
    step = (parts.max(axis=2) - low) / 15
    d, dmin = _f16_up(step.max(axis=1) / 63), _f16_up((-low).max(axis=1) / 63)
    sc = np.clip(np.rint(_safe_div(step, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(-low, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    eff = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # (n, 8), the stored step
    off = dmin.astype(np.float32)[:, None] * m.astype(np.float32)
    q = np.clip(np.rint(_safe_div(parts + off[:, :, None], eff[:, :, None])), 0, 15)
    return pack_q4_k(q.reshape(n, 256).astype(np.uint8), sc, m, d, dmin)
