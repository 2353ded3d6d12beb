"""Sparse encoding: exact bit streams and N:M ranks, every layout round-trips exactly through
meta()/arrays(), the chosen layout is the smallest, bytes fall with sparsity, values compose with
quantisation, and hostile parts are refused."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.encodings import DenseTensor, QuantScheme, encoding_from_parts, pack_codes, quantize
from modelpress.encodings.sparse import (
    SparseLayout,
    SparseTensor,
    choose_layout,
    nm_pattern,
    pack_bits,
    position_bytes,
    sparsify,
    unpack_bits,
)
from modelpress.errors import ConfigError, FormatError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mask(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    return torch.rand(rows, cols, generator=gen(seed)) < density


def nm_mask(rows: int, cols: int, n: int, m: int, seed: int) -> torch.Tensor:
    """Exactly n kept in every group of m consecutive columns, chosen at random."""
    order = torch.rand(rows, cols // m, m, generator=gen(seed)).argsort(-1)
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(rows, cols)


def reference_decode(shape, mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scatter kept values into zeros, one position at a time in row-major order."""
    out = torch.zeros(mask.numel())
    flat = mask.reshape(-1)
    it = iter(kept.reshape(-1).tolist())
    for i in range(flat.numel()):
        if flat[i]:
            out[i] = next(it)
    return out.reshape(shape)


def round_trip(enc: SparseTensor) -> SparseTensor:
    meta = json.loads(json.dumps(enc.meta()))  # the metadata must survive JSON
    back = encoding_from_parts(meta, {k: v.clone() for k, v in enc.arrays().items()})
    assert isinstance(back, SparseTensor)
    return back


# ---------------------------------------------------------------- bit streams and ranks


def test_pack_bits_golden_bytes():
    bits = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]])
    assert pack_bits(bits, 1).tolist() == [[0b00001101, 0b00000001]]
    codes = torch.tensor([[5, 2, 7]])  # 3-bit codes: 101, 010, 111 -> stream 101 010 111 (LSB first)
    assert pack_bits(codes, 3).tolist() == [[0b11010101, 0b00000001]]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), n=st.integers(0, 40), bits=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_unpack_inverts_pack(rows, n, bits, seed):
    codes = torch.randint(0, 1 << bits, (rows, n), generator=gen(seed))
    packed = pack_bits(codes, bits)
    assert packed.shape == (rows, math.ceil(n * bits / 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits, n), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_stream_is_the_packing_rule_of_quantised_codes(bits):
    codes = torch.randint(0, 1 << bits, (3, 24), generator=gen(bits))  # 24 codes: no padding either way
    assert torch.equal(pack_bits(codes, bits), pack_codes(codes, bits))


def test_nonzero_padding_bits_are_refused():
    packed = pack_bits(torch.ones(1, 3, dtype=torch.int32), 1)
    packed[0, 0] |= 0b1000_0000
    with pytest.raises(FormatError, match="padding"):
        unpack_bits(packed, 1, 3)


def test_nm_ranks_follow_the_documented_order():
    from modelpress.encodings.sparse import _nm_tables

    to_pattern, to_rank, bits = _nm_tables(2, 4)
    assert to_pattern.tolist() == [0b0011, 0b0101, 0b0110, 0b1001, 0b1010, 0b1100] and bits == 3
    assert [int(to_rank[p]) for p in to_pattern.tolist()] == list(range(6))
    assert _nm_tables(4, 8)[2] == 7 and len(_nm_tables(4, 8)[0]) == 70


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (1, 17), (True, 4), (2.0, 4)])
def test_invalid_nm_patterns(n, m):
    with pytest.raises(ConfigError, match="N:M"):
        nm_pattern(n, m)


# ---------------------------------------------------------------- exact round trips, every layout


VALUE_ENCODERS = {
    "fp32": None,
    "fp16": lambda v: DenseTensor(v.half()),
}


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), density=st.sampled_from([0.0, 0.03, 0.3, 0.5, 0.9, 1.0]),
       layout=st.sampled_from([SparseLayout.BITMASK, SparseLayout.CSR]), values=st.sampled_from(sorted(VALUE_ENCODERS)),
       seed=st.integers(0, 2**16))
def test_unstructured_layouts_round_trip_exactly(rows, cols, density, layout, values, seed):
    w = torch.randn(rows, cols, generator=gen(seed))
    mask = random_mask(rows, cols, density, seed + 1)
    enc = sparsify(w, mask, layout=layout, encode_values=VALUE_ENCODERS[values])
    dtype = torch.float16 if values == "fp16" else torch.float32
    expect = reference_decode(w.shape, mask, w.to(dtype)[mask].float())
    for got in (enc, round_trip(enc)):
        assert got.layout is layout and got.nnz == int(mask.sum())
        assert torch.equal(got.mask(), mask)
        assert torch.equal(got.decode(), expect)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 8),
                                                                             (8, 16), (5, 16)]),
       layout=st.sampled_from(list(SparseLayout)), seed=st.integers(0, 2**16))
def test_nm_masks_round_trip_exactly_in_every_layout(rows, groups, nm, layout, seed):
    n, m = nm
    w = torch.randn(rows, groups * m, generator=gen(seed))
    mask = nm_mask(rows, groups * m, n, m, seed)
    enc = sparsify(w, mask, nm=nm, layout=layout)
    back = round_trip(enc)
    assert back.layout is layout and back.values.shape == (rows, groups * n)  # N:M rows are uniform
    assert torch.equal(back.mask(), mask)
    assert torch.equal(back.decode(), torch.where(mask, w, 0.0))


@pytest.mark.parametrize("shape", [(6,), (4, 3, 2, 2), (1, 1), (5, 0)])
def test_any_shape_is_viewed_as_rows_by_columns(shape):
    w = torch.randn(shape, generator=gen(0))
    mask = torch.rand(shape, generator=gen(1)) < 0.5
    for layout in (SparseLayout.BITMASK, SparseLayout.CSR):
        back = round_trip(sparsify(w, mask, layout=layout))
        assert back.shape == shape and torch.equal(back.decode(), torch.where(mask, w, 0.0))


@pytest.mark.parametrize("group_size", ["channel", 16])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_values_compose(bits, group_size):
    w = torch.randn(8, 64, generator=gen(3))
    mask = nm_mask(8, 64, 2, 4, 4)
    scheme = QuantScheme(bits, False, group_size)
    enc = sparsify(w, mask, nm=(2, 4), encode_values=lambda v: quantize(v, scheme))
    kept = w[mask].reshape(8, 32)
    q = quantize(kept, scheme)
    back = round_trip(enc)
    assert back.values.kind == "quantized" and back.values.scheme == scheme
    assert torch.equal(back.decode(), reference_decode(w.shape, mask, q.decode()))  # exact: quantised kept values
    err = (back.decode() - torch.where(mask, w, 0.0)).abs().max()
    assert err <= (kept.max() - kept.min()) / (2**bits - 1)  # within one step of each row's grid


def test_ragged_rows_keep_flat_values():
    mask = torch.tensor([[True, False, True], [False, False, True]])
    enc = sparsify(torch.arange(6.0).reshape(2, 3), mask)
    assert enc.values.shape == (3,) and enc.kept_values().tolist() == [0.0, 2.0, 5.0]


def test_sparsify_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="bool tensor"):
        sparsify(w, torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(ConfigError, match="exactly 2 of every 4"):
        sparsify(w, random_mask(4, 8, 0.5, 0), nm=(2, 4))
    with pytest.raises(ConfigError, match="value encoder"):
        sparsify(w, random_mask(4, 8, 0.5, 0), encode_values=lambda v: DenseTensor(v.reshape(-1)[:1]))


# ---------------------------------------------------------------- sizes


def positions_nbytes(enc: SparseTensor) -> int:
    return sum(a.numel() * a.element_size() for a in enc.positions.values())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.sampled_from([8, 16, 24, 64, 100, 384]),
       density=st.floats(0.0, 1.0), use_nm=st.booleans(), seed=st.integers(0, 2**16))
def test_chosen_layout_is_the_smallest_and_the_size_table_is_exact(rows, cols, density, use_nm, seed):
    w = torch.randn(rows, cols, generator=gen(seed))
    nm = (2, 4) if use_nm and cols % 4 == 0 else None
    mask = nm_mask(rows, cols, 2, 4, seed) if nm else random_mask(rows, cols, density, seed)
    sizes = {}
    for layout in SparseLayout:
        if layout is SparseLayout.NM and nm is None:
            continue
        enc = sparsify(w, mask, nm=nm, layout=layout)
        sizes[layout] = positions_nbytes(enc)
        assert sizes[layout] == position_bytes(layout, rows, cols, int(mask.sum()), nm)
    chosen = sparsify(w, mask, nm=nm)
    assert chosen.layout is choose_layout(mask, nm)
    assert positions_nbytes(chosen) == min(sizes.values())


def test_nm_layout_is_chosen_for_2_4_and_beats_a_bitmask():
    mask = nm_mask(64, 128, 2, 4, 0)
    assert choose_layout(mask, (2, 4)) is SparseLayout.NM
    assert position_bytes(SparseLayout.NM, 64, 128, 0, (2, 4)) == 64 * 128 * 3 // 32  # 3 bits per group of 4
    assert position_bytes(SparseLayout.NM, 64, 128, 0, (2, 4)) < position_bytes(SparseLayout.BITMASK, 64, 128, 0)


@pytest.mark.parametrize("rows, cols", [(384, 384), (1536, 384), (40000, 16)])
def test_csr_index_widths_follow_the_matrix(rows, cols):
    enc = sparsify(torch.ones(rows, cols), random_mask(rows, cols, 0.01, 0), layout=SparseLayout.CSR)
    assert enc.positions["col"].dtype == torch.int16 and enc.positions["row_ptr"].dtype == torch.int32
    assert position_bytes(SparseLayout.CSR, 4, 40000, 10) == 5 * 4 + 10 * 4  # wide rows: int32 columns


def test_half_sparse_costs_at_most_60_percent_of_dense_fp32():
    w = torch.randn(1536, 384, generator=gen(0))
    enc = sparsify(w, random_mask(1536, 384, 0.5, 1))
    assert enc.nbytes / (w.numel() * 4) <= 0.60


def test_bytes_fall_with_sparsity():
    w = torch.randn(256, 384, generator=gen(0))
    sizes = [sparsify(w, random_mask(256, 384, 1 - s, 1)).nbytes for s in (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)]
    assert all(a > b for a, b in itertools.pairwise(sizes)), sizes
    assert sizes[-1] < 0.03 * w.numel() * 4


def test_half_sparse_4_bit_is_under_10_percent_of_fp32():
    w = torch.randn(384, 1536, generator=gen(0))
    scheme = QuantScheme(4, False, 64)
    enc = sparsify(w, nm_mask(384, 1536, 2, 4, 0), nm=(2, 4), encode_values=lambda v: quantize(v, scheme))
    assert enc.nbytes / (w.numel() * 4) <= 0.10


# ---------------------------------------------------------------- hostile parts


def _base(layout: SparseLayout, values=None):
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    mask = nm_mask(4, 8, 2, 4, 0) if layout is SparseLayout.NM else random_mask(4, 8, 0.5, 0)
    return sparsify(w, mask, nm=(2, 4) if layout is SparseLayout.NM else None, layout=layout, encode_values=values)


def _set(key, value):
    def edit(meta, arrays):
        meta[key] = value
    return edit


def _arr(key, fn):
    def edit(meta, arrays):
        arrays[key] = fn(arrays[key])
    return edit


def _drop(key):
    def edit(meta, arrays):
        del arrays[key]
    return edit


def _first(t: torch.Tensor, value) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


def _swap_cols(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0], t[1] = t[1].clone(), t[0].clone()
    return t


def _nested_sparse(meta, arrays):
    meta["values"] = {"kind": "sparse", "shape": [meta["nnz"]], "layout": "bitmask", "nnz": 0, "values": {}}


HOSTILE = {
    "nnz-wrong": (SparseLayout.BITMASK, _set("nnz", 3), "kept entries"),
    "nnz-negative": (SparseLayout.BITMASK, _set("nnz", -1), "invalid nnz"),
    "nnz-bool": (SparseLayout.BITMASK, _set("nnz", True), "invalid nnz"),
    "nnz-too-big": (SparseLayout.CSR, _set("nnz", 33), "invalid nnz"),
    "layout-unknown": (SparseLayout.BITMASK, _set("layout", "coo"), "unknown layout"),
    "shape-bad": (SparseLayout.BITMASK, _set("shape", [4, -8]), "invalid shape"),
    "mask-short": (SparseLayout.BITMASK, _arr("mask", lambda a: a[:3]), "one entry per row"),
    "mask-narrow": (SparseLayout.BITMASK, _arr("mask", lambda a: torch.cat([a, a], 1)), "do not hold"),
    "mask-dtype": (SparseLayout.BITMASK, _arr("mask", lambda a: a.to(torch.int8)), "do not hold"),
    "mask-bit-added": (SparseLayout.BITMASK, _arr("mask", lambda a: a | 1), "kept entries|values"),
    "mask-missing": (SparseLayout.BITMASK, _drop("mask"), "missing"),
    "extra-array": (SparseLayout.BITMASK, lambda m, a: a.__setitem__("col", torch.zeros(1, dtype=torch.int16)),
                    "unexpected arrays"),
    "nm-missing-pattern": (SparseLayout.NM, lambda m, a: m.pop("nm"), "without an N:M pattern"),
    "nm-pattern-invalid": (SparseLayout.NM, _set("nm", [4, 2]), "invalid N:M"),
    "nm-pattern-not-dividing": (SparseLayout.NM, _set("nm", [2, 3]), "rows of 8"),
    "nm-pattern-str": (SparseLayout.NM, _set("nm", "2:4"), "invalid N:M"),
    "nm-rank-out-of-range": (SparseLayout.NM, _arr("nm", lambda a: _first(a, 0b00000111)), "out of range"),
    "nm-padding": (SparseLayout.NM, _arr("nm", lambda a: _first(a, 0b11000000 | int(a.view(-1)[0]))), "padding"),
    "csr-ptr-dtype": (SparseLayout.CSR, _arr("row_ptr", lambda a: a.long()), "row_ptr is"),
    "csr-ptr-short": (SparseLayout.CSR, _arr("row_ptr", lambda a: a[:-1]), "one entry per row"),
    "csr-ptr-start": (SparseLayout.CSR, _arr("row_ptr", lambda a: _first(a, 1)), "rise from 0"),
    "csr-ptr-falls": (SparseLayout.CSR, _arr("row_ptr", lambda a: torch.cat([a[:1], a[2:3], a[1:2], a[3:]])),
                      "rise from 0"),
    "csr-col-range": (SparseLayout.CSR, _arr("col", lambda a: _first(a, 8)), "outside"),
    "csr-col-negative": (SparseLayout.CSR, _arr("col", lambda a: _first(a, -1)), "outside"),
    "csr-col-order": (SparseLayout.CSR, _arr("col", _swap_cols), "strictly increase"),
    "csr-col-dtype": (SparseLayout.CSR, _arr("col", lambda a: a.int()), "col is"),
    "values-count": (SparseLayout.BITMASK, _arr("values.values", lambda a: a[:-1]), "dense array|values"),
    "values-meta-missing": (SparseLayout.CSR, lambda m, a: m.pop("values"), "values metadata"),
    "values-nested-sparse": (SparseLayout.CSR, _nested_sparse, "nested-sparse"),
    "values-unknown-kind": (SparseLayout.CSR, lambda m, a: m["values"].__setitem__("kind", "zip"), "unknown encoding"),
}


@pytest.mark.parametrize("layout, edit, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_parts_are_refused(layout, edit, message):
    enc = _base(layout)
    meta, arrays = json.loads(json.dumps(enc.meta())), dict(enc.arrays())
    edit(meta, arrays)
    with pytest.raises(FormatError, match=message):
        encoding_from_parts(meta, arrays)


def test_uniform_values_shape_must_match_the_rows():
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    enc = sparsify(torch.randn(2, 4), mask)  # ragged rows: flat values
    meta, arrays = enc.meta(), dict(enc.arrays())
    meta["values"]["shape"] = [3, 1]
    arrays["values.values"] = arrays["values.values"].reshape(3, 1)
    with pytest.raises(FormatError, match="K kept in every row"):
        encoding_from_parts(meta, arrays)


def test_quantised_values_with_hostile_codes_are_refused():
    enc = _base(SparseLayout.NM, values=lambda v: quantize(v, QuantScheme(4, False, "channel")))
    meta, arrays = enc.meta(), dict(enc.arrays())
    arrays["values.codes"] = arrays["values.codes"][:, :1]
    with pytest.raises(FormatError, match="codes"):
        encoding_from_parts(meta, arrays)
