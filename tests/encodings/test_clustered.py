"""ClusteredTensor: exact round trips through arrays/meta/from_parts, hostile parts refused, nesting
inside SparseTensor, packing of every index width, and what cluster() promises."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modelpress.encodings import ENCODINGS, ClusteredTensor, SparseTensor, cluster, encoding_from_parts, sparsify
from modelpress.encodings.packing import INDEX_BITS, SUPPORTED_BITS, pack_codes, packed_row_bytes, unpack_codes
from modelpress.errors import ConfigError, FormatError


def reference_pack(rows: list[list[int]], bits: int) -> list[list[int]]:
    """packing.py's rule bit by bit: LSB-first stream per row, rows padded with zero codes to 8 codes."""
    out = []
    for r in rows:
        n = len(r) + (-len(r)) % 8 if bits < 8 else len(r)
        stream = [0] * (n * bits)
        for j, c in enumerate(r):
            for t in range(bits):
                stream[j * bits + t] = (c >> t) & 1
        out.append([sum(stream[8 * i + k] << k for k in range(8)) for i in range(len(stream) // 8)])
    return out


def roundtrip(enc):
    meta = json.loads(json.dumps(enc.meta()))  # what a file holds
    return encoding_from_parts(meta, {k: v.clone() for k, v in enc.arrays().items()})


# ---------------------------------------------------------------- packing of every width


@pytest.mark.parametrize("bits", INDEX_BITS)
def test_every_width_packs_by_the_documented_rule(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 21), generator=g)
    packed = pack_codes(codes, bits, widths=INDEX_BITS)
    assert packed.shape == (3, packed_row_bytes(21, bits, INDEX_BITS))
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, 21, widths=INDEX_BITS), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_existing_widths_give_the_same_bytes_either_way(bits):
    codes = torch.randint(0, 1 << bits, (4, 37), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_codes(codes, bits), pack_codes(codes, bits, widths=INDEX_BITS))


@pytest.mark.parametrize(("bits", "codes", "expected"), [
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0x8D, 0x01]),  # byte i = codes 8i..8i+7, lowest bit first
    (5, [31, 0, 0, 0, 0, 0, 0, 1], [0x1F, 0, 0, 0, 0x08]),  # code 7 sits at stream bits 35..39
    (6, [1, 2, 0, 0, 0, 0, 0, 0], [0x81, 0, 0, 0, 0, 0]),  # code 1 = 2 at bits 6..11: bit 7 of byte 0
    (7, [0, 0, 0, 0, 0, 0, 0, 127], [0, 0, 0, 0, 0, 0, 0xFE]),  # bits 49..55
])
def test_golden_bytes_of_new_widths(bits, codes, expected):
    assert reference_pack([codes], bits) == [expected]
    assert pack_codes(torch.tensor([codes]), bits, widths=INDEX_BITS).tolist() == [expected]


def test_quantisation_widths_are_unchanged():
    with pytest.raises(ConfigError, match=r"unsupported bit width 5: use one of \(2, 3, 4, 8\)"):
        pack_codes(torch.zeros(1, 8, dtype=torch.uint8), 5)


# ---------------------------------------------------------------- round trips


@st.composite
def clustered(draw):
    bits = draw(st.sampled_from(INDEX_BITS))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    k = draw(st.integers(1, min(1 << bits, 40)))
    codebook = draw(arrays(np.float16, (k,), elements=st.floats(-4, 4, width=16)))
    labels = draw(arrays(np.int64, shape, elements=st.integers(0, k - 1)))
    return ClusteredTensor.from_labels(torch.from_numpy(codebook), torch.from_numpy(labels), bits), labels, codebook


@settings(max_examples=120, deadline=None)
@given(clustered())
def test_round_trip_is_exact(case):
    enc, labels, codebook = case
    back = roundtrip(enc)
    assert isinstance(back, ClusteredTensor) and back.meta() == enc.meta()
    assert back.shape == labels.shape
    assert all(torch.equal(back.arrays()[k], v) for k, v in enc.arrays().items())
    assert torch.equal(back.labels(), torch.from_numpy(labels))
    expected = torch.from_numpy(codebook.astype(np.float32)[labels])  # the plain reference: codebook[labels]
    assert torch.equal(back.decode(), expected)
    assert back.decode(torch.float16).dtype == torch.float16


def test_registered_and_sized():
    assert ENCODINGS["clustered"] is ClusteredTensor
    enc = ClusteredTensor.from_labels(torch.zeros(16, dtype=torch.float16), torch.zeros(10, 24, dtype=torch.long), 4)
    assert enc.indices.shape == (10, 12) and enc.nbytes == 10 * 12 + 16 * 2
    assert enc.meta() == {"kind": "clustered", "shape": [10, 24], "bits": 4}


def test_decode_rows_matches_decode():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    enc = cluster(w, 3)
    idx = torch.tensor([3, 0, 11, 3])
    assert torch.equal(enc.decode_rows(idx), enc.decode()[idx])


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_nested_inside_sparse(bits):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits))
    for mask in (w.abs() > 0.7, torch.ones_like(w, dtype=torch.bool).tril()):  # ragged rows: (nnz,) values
        enc = sparsify(w, mask, encode_values=lambda v: cluster(v, bits))
        assert isinstance(enc.values, ClusteredTensor)
        back = roundtrip(enc)
        assert isinstance(back, SparseTensor) and isinstance(back.values, ClusteredTensor)
        out = back.decode()
        assert torch.equal(out, enc.decode())
        assert torch.equal(out[~mask], torch.zeros(int((~mask).sum())))  # pruned entries stay exactly zero
        assert torch.equal(out[mask], back.values.decode().reshape(-1))
        assert len(torch.unique(out[mask])) <= 1 << bits


def test_hostile_values_inside_sparse_are_refused():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    enc = sparsify(w, w.abs() > 0.3, encode_values=lambda v: cluster(v, 2))
    parts = enc.arrays()
    parts["values.codebook"] = parts["values.codebook"][:1].clone()  # indices now point past the codebook
    with pytest.raises(FormatError, match="index outside its codebook"):
        encoding_from_parts(enc.meta(), parts)


# ---------------------------------------------------------------- hostile parts


def good() -> ClusteredTensor:
    labels = torch.arange(3 * 10).reshape(3, 10) % 5
    return ClusteredTensor.from_labels(torch.linspace(-1, 1, 5).half(), labels, 3)


def corrupt(meta=None, **arrays):
    enc = good()
    parts = {**enc.arrays(), **arrays}
    return {**enc.meta(), **(meta or {})}, {k: v for k, v in parts.items() if v is not None}


HOSTILE = [
    ("bits-0", corrupt({"bits": 0}), "invalid index width 0"),
    ("bits-9", corrupt({"bits": 9}), "invalid index width 9"),
    ("bits-true", corrupt({"bits": True}), "invalid index width True"),
    ("bits-string", corrupt({"bits": "3"}), "invalid index width '3'"),
    ("bits-missing", corrupt({"bits": None}), "invalid index width None"),
    ("bits-too-narrow", corrupt({"bits": 2}), r"expected 1..4 float16 centroids"),  # 5 centroids, 2-bit indices
    ("shape-negative", corrupt({"shape": [3, -10]}), "invalid shape"),
    ("shape-cols", corrupt({"shape": [3, 17]}), r"indices are \(3, 6\) torch.uint8, expected \(3, 9\) uint8"),
    ("shape-rows", corrupt({"shape": [4, 10]}), r"expected \(4, 6\) uint8"),
    ("missing-codebook", corrupt(codebook=None), "missing its 'codebook' array"),
    ("missing-indices", corrupt(indices=None), "missing its 'indices' array"),
    ("extra-array", corrupt(scale=torch.ones(1)), r"unexpected arrays \['scale'\]"),
    ("codebook-f32", corrupt(codebook=torch.zeros(5)), "codebook is .* torch.float32"),
    ("codebook-2d", corrupt(codebook=torch.zeros(5, 1, dtype=torch.float16)), r"codebook is \(5, 1\)"),
    ("codebook-empty", corrupt(codebook=torch.zeros(0, dtype=torch.float16)), r"codebook is \(0,\)"),
    ("codebook-too-long", corrupt(codebook=torch.zeros(9, dtype=torch.float16)), r"expected 1..8 float16"),
    ("codebook-nan", corrupt(codebook=torch.tensor([0, 1, float("nan"), 2, 3], dtype=torch.float16)), "NaN"),
    ("codebook-inf", corrupt(codebook=torch.tensor([0, 1, float("inf"), 2, 3], dtype=torch.float16)), "infinity"),
    ("codebook-short", corrupt(codebook=torch.zeros(4, dtype=torch.float16)), "index outside its codebook of 4"),
    ("indices-int8", corrupt(indices=torch.zeros(3, 6, dtype=torch.int8)), "indices are .* torch.int8"),
    ("indices-wide", corrupt(indices=torch.zeros(3, 7, dtype=torch.uint8)), r"indices are \(3, 7\)"),
    ("indices-3d", corrupt(indices=torch.zeros(3, 6, 1, dtype=torch.uint8)), r"indices are \(3, 6, 1\)"),
    ("index-7", corrupt(indices=torch.full((3, 6), 0xFF, dtype=torch.uint8)), "index outside its codebook"),
    ("padding", corrupt(indices=torch.cat([good().indices[:, :5], torch.full((3, 1), 0x80, dtype=torch.uint8)], 1)),
     "non-zero padding"),
]


@pytest.mark.parametrize(("parts", "message"), [pytest.param(p, m, id=i) for i, p, m in HOSTILE])
def test_hostile_parts_raise_format_error(parts, message):
    meta, arrays_ = parts
    with pytest.raises(FormatError, match=message):
        encoding_from_parts(meta, arrays_)


def test_the_hostile_padding_case_only_touches_padding():
    enc = good()
    packed = enc.indices.clone()
    packed[:, 5] |= 0x80  # 10 codes of 3 bits = 30 bits; bit 47 belongs to padding code 15
    assert torch.equal(unpack_codes(packed, 3, 10, widths=INDEX_BITS), enc.labels().to(torch.uint8))


@pytest.mark.parametrize(("codebook", "labels", "bits", "message"), [
    (torch.zeros(3), torch.zeros(4, dtype=torch.long), 1, r"needs 1..2 centroids"),
    (torch.zeros(0), torch.zeros(4, dtype=torch.long), 2, r"needs 1..4 centroids"),
    (torch.zeros(2), torch.tensor([0, 2]), 2, r"labels must lie in \[0, 2\)"),
    (torch.zeros(2), torch.tensor([-1, 0]), 2, r"labels must lie in \[0, 2\)"),
    (torch.zeros(2), torch.tensor([0, 1]), 9, "cluster index width 9 is not valid"),
])
def test_from_labels_validates(codebook, labels, bits, message):
    with pytest.raises(ConfigError, match=message):
        ClusteredTensor.from_labels(codebook, labels, bits)


# ---------------------------------------------------------------- cluster()


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_more_lloyd_iterations_never_increase_the_error(init):
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3)) ** 3  # heavy tails
    errors = [float((cluster(w, 3, init, it).decode() - w).pow(2).sum()) for it in (0, 1, 3, 10, 30)]
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_codebook_entries_are_used_distinct_and_rounded():
    w = torch.randn(50, 50, generator=torch.Generator().manual_seed(0))
    enc = cluster(w, 4)
    cb = enc.codebook
    assert cb.dtype == torch.float16 and 1 <= cb.numel() <= 16
    assert len(torch.unique(cb)) == cb.numel()
    assert torch.equal(torch.bincount(enc.labels().reshape(-1), minlength=cb.numel()) > 0,
                       torch.ones(cb.numel(), dtype=torch.bool))
    nearest = (w.reshape(-1, 1) - cb.float().reshape(1, -1)).abs().argmin(1)  # O(n k) reference assignment
    assert torch.equal(enc.labels().reshape(-1), nearest)


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_converged_centroids_are_the_means_of_their_members(init):
    w = torch.randn(40, 50, generator=torch.Generator().manual_seed(5))
    enc = cluster(w, 3, init, iterations=200)
    labels = enc.labels().reshape(-1)
    for j, c in enumerate(enc.codebook.float()):
        mean = w.reshape(-1)[labels == j].mean()
        assert abs(float(c - mean)) <= 1e-3 * abs(float(mean)) + 1e-4  # a Lloyd fixed point, up to float16


def test_random_init_reaches_every_value_of_a_small_alphabet():
    values = torch.tensor([-0.5, 0.0, 0.25, 1.5, 3.0])
    w = values[torch.arange(60) % 5].reshape(6, 10)
    assert torch.equal(cluster(w, 3, "random", seed=0).decode(), w)  # 8 draws from 60 cover all 5 here


def test_constant_and_empty_tensors():
    enc = cluster(torch.full((4, 4), 0.3), 4)
    assert enc.codebook.numel() == 1 and torch.equal(enc.decode(), torch.full((4, 4), 0.3).half().float())
    empty = cluster(torch.zeros(0, 5), 2)
    assert empty.decode().shape == (0, 5) and roundtrip(empty).shape == (0, 5)


def test_random_init_is_seeded():
    w = torch.randn(30, 30, generator=torch.Generator().manual_seed(0))
    a, b, c = (cluster(w, 3, "random", 2, seed) for seed in (1, 1, 2))
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)


@pytest.mark.parametrize(("w", "bits", "message"), [
    (torch.tensor([1.0, float("nan")]), 2, "NaN or infinity"),
    (torch.tensor([1.0, 1e6]), 1, "float16 range"),
    (torch.ones(3), 0, "cluster index width 0"),
    (torch.ones(3), True, "cluster index width True"),
])
def test_cluster_refuses(w, bits, message):
    with pytest.raises(ConfigError, match=message):
        cluster(w, bits)


def test_bits_per_weight():
    enc = cluster(torch.randn(64, 256), 4)
    assert math.isclose(enc.bits_per_weight, 4 + 16 * enc.codebook.numel() / (64 * 256))
