"""Low-rank encoding: decodes to left @ right in the weight's shape, round-trips exactly through
meta()/arrays() with dense and quantised factors, counts its bytes, and refuses hostile parts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.encodings import (
    DenseTensor,
    Encoding,
    LowRankTensor,
    QuantizedTensor,
    QuantScheme,
    encoding_from_parts,
    quantize,
    sparsify,
)
from modelpress.encodings.lowrank import factored_is_cheaper
from modelpress.errors import ConfigError, FormatError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_factors(rows: int, cols: int, rank: int, seed: int = 0, dtype=torch.float32) -> tuple[Encoding, Encoding]:
    left = torch.randn(rows, rank, generator=gen(seed)).to(dtype)
    right = torch.randn(rank, cols, generator=gen(seed + 1)).to(dtype)
    return DenseTensor(left), DenseTensor(right)


def lowrank(shape: tuple[int, ...], rank: int, seed: int = 0, bits: int | None = None, group_size=0) -> LowRankTensor:
    rows, cols = shape[0], math.prod(shape[1:])
    left, right = dense_factors(rows, cols, rank, seed)
    if bits is not None:
        left = quantize(left.values, QuantScheme(bits, False, group_size if rank % max(group_size, 1) == 0 else 0))
        right = quantize(right.values, QuantScheme(bits, False, group_size))
    return LowRankTensor(left, right, shape)


def round_trip(enc: LowRankTensor) -> LowRankTensor:
    meta = json.loads(json.dumps(enc.meta()))  # the metadata must survive JSON
    back = encoding_from_parts(meta, {k: v.clone() for k, v in enc.arrays().items()})
    assert isinstance(back, LowRankTensor)
    return back


# ---------------------------------------------------------------- decoding and size


@pytest.mark.parametrize("shape", [(6, 10), (6, 3, 3, 3), (1, 5), (7, 1)])
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_decode_is_the_product_of_the_factors_in_the_weight_shape(shape, bits):
    enc = lowrank(shape, rank=2, bits=bits)
    reference = (enc.left.decode() @ enc.right.decode()).reshape(shape)
    assert enc.shape == shape and enc.rank == 2
    assert torch.equal(enc.decode(), reference)
    assert enc.decode(torch.float16).dtype == torch.float16


def test_arrays_are_the_factors_arrays_under_dotted_prefixes():
    enc = lowrank((8, 16), rank=3, bits=4)
    arrays = enc.arrays()
    assert set(arrays) == {"left.codes", "left.scale", "left.zero", "right.codes", "right.scale", "right.zero"}
    assert arrays["right.codes"] is enc.right.arrays()["codes"]
    assert enc.meta() == {"kind": "lowrank", "shape": [8, 16], "rank": 3, "left": enc.left.meta(),
                          "right": enc.right.meta()}


def test_bytes_are_the_factors_bytes():
    enc = lowrank((384, 1536), rank=64)
    assert enc.nbytes == 4 * 64 * (384 + 1536)
    quant = lowrank((384, 1536), rank=64, bits=4, group_size=64)
    assert quant.nbytes == quant.left.nbytes + quant.right.nbytes < enc.nbytes // 6


@pytest.mark.parametrize(("rank", "rows", "cols", "cheaper"),
                         [(1, 3, 3, True), (1, 2, 2, False), (1, 1, 1, False), (2, 4, 4, False), (191, 384, 384, True),
                          (192, 384, 384, False), (307, 1536, 384, True), (308, 1536, 384, False)])
def test_factored_is_cheaper_is_r_times_r_plus_c_below_r_c(rank, rows, cols, cheaper):
    assert factored_is_cheaper(rank, rows, cols) is cheaper
    assert (rank * (rows + cols) < rows * cols) is cheaper


# ---------------------------------------------------------------- round trips (hypothesis)


@st.composite
def lowrank_tensors(draw) -> LowRankTensor:
    rows = draw(st.integers(1, 12))
    tail = draw(st.sampled_from([(), (1, 1), (2, 3)]))
    cols = draw(st.integers(1, 12)) * (math.prod(tail) if tail else 1)
    shape = (rows, cols // math.prod(tail), *tail) if tail else (rows, cols)
    rank = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    factors = []
    for i, (r, c) in enumerate([(rows, rank), (rank, cols)]):
        values = torch.randn(r, c, generator=gen(seed + i)) * draw(st.floats(1e-3, 10.0))
        kind = draw(st.sampled_from(["fp32", "fp16", "quantized"]))
        if kind == "quantized":
            bits = draw(st.sampled_from([2, 3, 4, 8]))
            groups = [d for d in (1, 2, 3) if c % d == 0]
            granularity = draw(st.sampled_from(["channel", "tensor", *groups]))
            factors.append(quantize(values, QuantScheme(bits, False, granularity)))
        else:
            factors.append(DenseTensor(values.half() if kind == "fp16" else values))
    return LowRankTensor(factors[0], factors[1], shape)


@settings(max_examples=80, deadline=None)
@given(lowrank_tensors())
def test_round_trip_through_meta_and_arrays_is_exact(enc):
    back = round_trip(enc)
    assert back.shape == enc.shape and back.rank == enc.rank and back.meta() == enc.meta()
    assert set(back.arrays()) == set(enc.arrays())
    for name, array in enc.arrays().items():
        assert back.arrays()[name].dtype == array.dtype and torch.equal(back.arrays()[name], array)
    for name in ("left", "right"):
        assert type(getattr(back, name)) is type(getattr(enc, name))
    assert torch.equal(back.decode(), enc.decode())


# ---------------------------------------------------------------- hostile parts


def parts(enc: LowRankTensor) -> tuple[dict, dict]:
    return json.loads(json.dumps(enc.meta())), dict(enc.arrays())


def _rank(meta, arrays, value):
    meta["rank"] = value


def _shape(meta, arrays, value):
    meta["shape"] = value


HOSTILE_META = {
    "rank larger than the factors'": (_rank, 4),
    "rank smaller than the factors'": (_rank, 2),
    "rank zero": (_rank, 0),
    "negative rank": (_rank, -3),
    "rank as bool": (_rank, True),
    "rank as string": (_rank, "3"),
    "rank as float": (_rank, 3.0),
    "rank missing": (lambda m, a, v: m.pop("rank"), None),
    "fewer rows": (_shape, [7, 12]),
    "more columns": (_shape, [8, 13]),
    "same size, other split": (_shape, [12, 8]),
    "conv shape of another size": (_shape, [8, 3, 2, 3]),
    "one-dimensional": (_shape, [96]),
    "scalar": (_shape, []),
    "shape not a list": (_shape, "8x12"),
}


@pytest.mark.parametrize("name", HOSTILE_META)
def test_inconsistent_metadata_is_refused(name):
    meta, arrays = parts(lowrank((8, 12), rank=3))
    edit, value = HOSTILE_META[name]
    edit(meta, arrays, value)
    with pytest.raises(FormatError, match="corrupt"):
        encoding_from_parts(meta, arrays)


def test_factors_whose_inner_dimensions_disagree_are_refused():
    left, _ = dense_factors(8, 12, 3)
    _, right = dense_factors(8, 12, 4)
    meta = {"kind": "lowrank", "shape": [8, 12], "rank": 3, "left": left.meta(), "right": right.meta()}
    arrays = {"left.values": left.values, "right.values": right.values}
    with pytest.raises(FormatError, match=r"needs \(8, 3\) @ \(3, 12\)"):
        encoding_from_parts(meta, arrays)


def test_factor_whose_array_disagrees_with_its_metadata_is_refused():
    meta, arrays = parts(lowrank((8, 12), rank=3))
    arrays["right.values"] = torch.zeros(3, 11)
    with pytest.raises(FormatError, match="dense array has shape"):
        encoding_from_parts(meta, arrays)


def test_transposed_factors_are_refused():
    enc = lowrank((8, 12), rank=3)
    meta, _ = parts(enc)
    meta["left"]["shape"], meta["right"]["shape"] = [3, 8], [12, 3]
    arrays = {"left.values": enc.left.values.T.contiguous(), "right.values": enc.right.values.T.contiguous()}
    with pytest.raises(FormatError, match="lowrank encoding has factors"):
        encoding_from_parts(meta, arrays)


@pytest.mark.parametrize("missing", ["left.values", "right.values"])
def test_missing_factor_array_is_refused(missing):
    meta, arrays = parts(lowrank((8, 12), rank=3))
    del arrays[missing]
    with pytest.raises(FormatError, match="missing its 'values' array"):
        encoding_from_parts(meta, arrays)


def test_unexpected_array_is_refused():
    meta, arrays = parts(lowrank((8, 12), rank=3))
    arrays["values"] = torch.zeros(8, 12)
    with pytest.raises(FormatError, match=r"unexpected arrays \['values'\]"):
        encoding_from_parts(meta, arrays)


@pytest.mark.parametrize("factor", ["left", "right"])
def test_missing_or_non_mapping_factor_metadata_is_refused(factor):
    meta, arrays = parts(lowrank((8, 12), rank=3))
    for bad in (None, [1, 2], "dense"):
        meta[factor] = bad
        with pytest.raises(FormatError, match=f"{factor} factor of kind None"):
            encoding_from_parts(meta, arrays)


def test_nested_lowrank_or_sparse_factors_are_refused():
    inner = lowrank((8, 3), rank=2)
    _, right = dense_factors(8, 12, 3)
    meta = {"kind": "lowrank", "shape": [8, 12], "rank": 3, "left": inner.meta(), "right": right.meta()}
    arrays = {**{f"left.{k}": v for k, v in inner.arrays().items()}, "right.values": right.values}
    with pytest.raises(FormatError, match="left factor of kind 'lowrank'"):
        encoding_from_parts(meta, arrays)
    sparse = sparsify(torch.randn(8, 3), torch.ones(8, 3, dtype=torch.bool))
    meta["left"] = sparse.meta()
    arrays = {**{f"left.{k}": v for k, v in sparse.arrays().items()}, "right.values": right.values}
    with pytest.raises(FormatError, match="left factor of kind 'sparse'"):
        encoding_from_parts(meta, arrays)


def test_quantised_factor_with_wrong_codes_is_refused():
    meta, arrays = parts(lowrank((8, 12), rank=4, bits=4))
    arrays["left.codes"] = arrays["left.codes"][:, :1].contiguous()
    with pytest.raises(FormatError, match="quantized array 'codes'"):
        encoding_from_parts(meta, arrays)


def test_building_from_mismatched_factors_in_code_is_a_config_error():
    left, right = dense_factors(8, 12, 3)
    with pytest.raises(ConfigError, match="cannot build a low-rank weight"):
        LowRankTensor(left, right, (8, 13))
    with pytest.raises(ConfigError, match="cannot build a low-rank weight"):
        LowRankTensor(DenseTensor(torch.zeros(8)), right, (8, 12))
    assert isinstance(LowRankTensor(left, right, (8, 3, 2, 2)), LowRankTensor)
    assert not isinstance(left, QuantizedTensor)
