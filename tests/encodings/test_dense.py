"""Dense encoding: lossless round trip through meta()/arrays(), and hostile parts."""

from __future__ import annotations

import json

import pytest
import torch

from modelpress.encodings import ENCODINGS, DenseTensor, encoding_from_parts
from modelpress.errors import FormatError


def values(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_registered_under_its_kind():
    assert ENCODINGS["dense"] is DenseTensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 8), (3, 2, 2, 2), (7,), ()])
def test_round_trip_is_exact(dtype, shape):
    v = values(shape, dtype)
    enc = DenseTensor(v)
    assert enc.shape == tuple(shape)
    meta = json.loads(json.dumps(enc.meta()))
    assert meta == {"kind": "dense", "shape": list(shape)}
    back = encoding_from_parts(meta, {k: a.clone() for k, a in enc.arrays().items()})
    assert isinstance(back, DenseTensor)
    assert back.values.dtype == dtype and torch.equal(back.values, v)
    assert torch.equal(back.decode(dtype), v)
    assert torch.equal(back.decode(), v.float())


@pytest.mark.parametrize(("dtype", "bits"), [(torch.float32, 32.0), (torch.float16, 16.0), (torch.bfloat16, 16.0)])
def test_bits_per_weight(dtype, bits):
    enc = DenseTensor(values((6, 10), dtype))
    assert enc.numel == 60
    assert enc.nbytes == 60 * bits / 8
    assert enc.bits_per_weight == bits


def _parts(meta=None, arrays=None, drop=()):
    m = {"kind": "dense", "shape": [4, 8]}
    a = {"values": values((4, 8))}
    m.update(meta or {})
    a.update(arrays or {})
    for k in drop:
        m.pop(k, None)
        a.pop(k, None)
    return m, a


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        pytest.param(_parts(drop=("values",)), "dense encoding is missing its 'values' array", id="missing"),
        pytest.param(_parts({"shape": [8, 4]}), r"dense array has shape \(4, 8\) torch.float32, metadata says \(8, 4\)",
                     id="shape-disagrees"),
        pytest.param(_parts(arrays={"values": torch.zeros(4, 8, dtype=torch.int32)}), "torch.int32", id="int-dtype"),
        pytest.param(_parts(arrays={"values": torch.zeros(4, 8, dtype=torch.uint8)}), "torch.uint8", id="uint8"),
        pytest.param(_parts(arrays={"values": torch.zeros(4, 8, dtype=torch.float64)}), "torch.float64", id="float64"),
        pytest.param(_parts(arrays={"values": torch.zeros(32)}), r"\(32,\)", id="flattened"),
        pytest.param(_parts({"shape": [4, -8]}), r"dense encoding has an invalid shape \[4, -8\]", id="negative-dim"),
        pytest.param(_parts({"shape": "4,8"}), "invalid shape '4,8'", id="shape-string"),
        pytest.param(_parts({"shape": [4.0, 8]}), "invalid shape", id="shape-float"),
        pytest.param(_parts(drop=("shape",)), "invalid shape None", id="shape-missing"),
        pytest.param(_parts({"shape": [1] * 9}), "invalid shape", id="too-many-dims"),
        pytest.param(_parts({"kind": "densest"}), "unknown encoding kind 'densest'", id="unknown-kind"),
    ],
)
def test_hostile_parts_raise_format_error(parts, message):
    meta, arrays = parts
    with pytest.raises(FormatError, match=message):
        encoding_from_parts(meta, arrays)
