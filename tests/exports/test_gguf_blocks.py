"""llama.cpp's block layouts, packed by us: every packer round-trips its codes and scales, decodes to the
type's formula (computed here byte by byte, as ggml-common.h lays the block out, and by the gguf
package's own dequantiser, bit for bit), and the requantisers stay within their step."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.formats import gguf_blocks as gb

N = st.integers(1, 6)  # blocks
KINDS = [gb.Q8_0, gb.Q4_0, gb.Q4_1, gb.Q5_0, gb.Q5_1, gb.Q4_K, gb.Q6_K]


def _scales(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)).astype(np.float16)


def _reference(block: bytes, kind: int) -> list[float]:
    """One block decoded element by element from its bytes (ggml-common.h's struct order)."""
    half = lambda b: float(np.frombuffer(b, "<f2")[0])  # noqa: E731
    if kind == gb.Q8_0:
        d = half(block[:2])
        return [d * v for v in struct.unpack("<32b", block[2:34])]
    if kind in (gb.Q4_0, gb.Q4_1, gb.Q5_0, gb.Q5_1):
        offset = kind in (gb.Q4_1, gb.Q5_1)
        d, m = half(block[:2]), half(block[2:4]) if offset else 0.0
        start = 4 if offset else 2
        high = struct.unpack("<I", block[start:start + 4])[0] if kind in (gb.Q5_0, gb.Q5_1) else 0
        qs = block[start + (4 if kind in (gb.Q5_0, gb.Q5_1) else 0):][:16]
        q = [(qs[j % 16] >> (4 * (j // 16)) & 15) | ((high >> j) & 1) << 4 for j in range(32)]
        mid = {gb.Q4_0: 8, gb.Q5_0: 16}.get(kind)
        return [d * (v - mid) for v in q] if mid else [d * v + m for v in q]
    if kind == gb.Q4_K:
        d, dmin, scales, qs = half(block[:2]), half(block[2:4]), block[4:16], block[16:144]
        out = []
        for j in range(256):
            h, t = divmod(j, 64)
            s = j // 32
            if s < 4:
                sc, m = scales[s] & 63, scales[s + 4] & 63
            else:
                sc = (scales[s + 4] & 15) | (scales[s - 4] >> 6) << 4
                m = (scales[s + 4] >> 4) | (scales[s] >> 6) << 4
            out.append(d * sc * ((qs[32 * h + t % 32] >> (4 * (t // 32))) & 15) - dmin * m)
        return out
    ql, qh, sc = block[:128], block[128:192], struct.unpack("<16b", block[192:208])
    d = half(block[208:210])
    out = []
    for j in range(256):
        h, t = divmod(j, 128)
        low = (ql[64 * h + t % 64] >> (4 * (t // 64))) & 15
        high = (qh[32 * h + t % 32] >> (2 * (t // 32))) & 3
        out.append(d * sc[j // 16] * ((low | high << 4) - 32))
    return out


def _random_blocks(kind: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    d = _scales(n, seed)
    if kind == gb.Q8_0:
        q = rng.integers(-128, 128, (n, 32)).astype(np.int8)
        return (q, d), gb.pack_q8_0(q, d), gb.unpack_q8_0
    if kind == gb.Q4_0:
        q = rng.integers(0, 16, (n, 32)).astype(np.uint8)
        return (q, d), gb.pack_q4_0(q, d), gb.unpack_q4_0
    if kind == gb.Q4_1:
        q, m = rng.integers(0, 16, (n, 32)).astype(np.uint8), _scales(n, seed + 1)
        return (q, d, m), gb.pack_q4_1(q, d, m), gb.unpack_q4_1
    if kind == gb.Q5_0:
        q = rng.integers(0, 32, (n, 32)).astype(np.uint8)
        return (q, d), gb.pack_q5_0(q, d), gb.unpack_q5_0
    if kind == gb.Q5_1:
        q, m = rng.integers(0, 32, (n, 32)).astype(np.uint8), _scales(n, seed + 1)
        return (q, d, m), gb.pack_q5_1(q, d, m), gb.unpack_q5_1
    if kind == gb.Q4_K:
        q, dmin = rng.integers(0, 16, (n, 256)).astype(np.uint8), _scales(n, seed + 1)
        sc, m = rng.integers(0, 64, (n, 8)).astype(np.uint8), rng.integers(0, 64, (n, 8)).astype(np.uint8)
        return (q, sc, m, d, dmin), gb.pack_q4_k(q, sc, m, d, dmin), gb.unpack_q4_k
    q, sc = rng.integers(0, 64, (n, 256)).astype(np.uint8), rng.integers(-128, 128, (n, 16)).astype(np.int8)
    return (q, sc, d), gb.pack_q6_k(q, sc, d), gb.unpack_q6_k


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(n=N, seed=st.integers(0, 2**32 - 1))
def test_pack_round_trips_and_decodes_by_the_formula(kind, n, seed):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    fields, blocks, unpack = _random_blocks(kind, n, seed)
    assert blocks.shape == (n, gb.BYTES[kind]) and blocks.dtype == np.uint8
    for got, want in zip(unpack(blocks), fields):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    ours = gb.dequantise(blocks, kind)
    reference = np.array([_reference(bytes(b), kind) for b in blocks], dtype=np.float64)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=0)
    theirs = dequantize(blocks, GGMLQuantizationType(kind)).reshape(n, -1)
    assert ours.dtype == theirs.dtype == np.float32 and np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(n=N, seed=st.integers(0, 2**32 - 1), spread=st.floats(1e-3, 1e3))
def test_requantise_stays_within_its_step(kind, n, seed, spread):
    w = (np.random.default_rng(seed).standard_normal((n, gb.BLOCK[kind])) * spread).astype(np.float32)
    blocks = gb.quantise(w, kind)
    err = np.abs(gb.dequantise(blocks, kind) - w).max(axis=1)
    amax = np.abs(w).max(axis=1)
    rng = w.max(axis=1) - w.min(axis=1)
    # Q4_K (a sub-block spans [min(0, lo), hi], at most max(range, amax)): half its largest step, plus what
    # rounding the steps to 6-bit multiples of d (max step / 63) can clip at the top code (7.5 d) and rounding the
    # offset to a multiple of dmin (<= amax / 63) can shift
    bound = {gb.Q8_0: amax / 127 * 0.501, gb.Q4_0: amax / 8 * 1.001, gb.Q4_1: rng / 15 * 0.51,
             gb.Q5_0: amax / 16 * 1.001, gb.Q5_1: rng / 31 * 0.52, gb.Q6_K: amax / 31 * 0.6,
             gb.Q4_K: np.maximum(rng, amax) / 15 * (0.51 + 8 / 63) + amax / 63 * 0.51}[kind]
    assert (err <= bound * 1.002 + 1e-30).all()


def test_zero_blocks_stay_zero():
    for kind in KINDS:
        w = np.zeros((2, gb.BLOCK[kind]), np.float32)
        assert not gb.dequantise(gb.quantise(w, kind), kind).any()


def test_unknown_type_is_refused():
    with pytest.raises(ValueError):
        gb.dequantise(np.zeros((1, 34), np.uint8), 99)
