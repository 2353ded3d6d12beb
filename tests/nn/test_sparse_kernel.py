"""The sparse CSR kernel: equal to decode-then-matmul for every layout and value encoding, admitted
by the capability table only for 2-D sparse weights, and chosen by AUTO only when measured faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelpress.encodings import DenseTensor, QuantScheme, quantize
from modelpress.encodings.sparse import SparseLayout, sparsify
from modelpress.errors import ConfigError
from modelpress.nn import CompressedLinear, Kernel, select_kernel, supports
from modelpress.nn import kernels
from modelpress.nn.sparse import csr_weight


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sparse(out_f: int = 48, in_f: int = 64, density: float = 0.3, layout=None, values=None, seed: int = 0):
    w = torch.randn(out_f, in_f, generator=gen(seed))
    if layout is SparseLayout.NM:
        order = torch.rand(out_f, in_f // 4, 4, generator=gen(seed + 1)).argsort(-1)
        mask = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True).reshape(out_f, in_f)
        return sparsify(w, mask, nm=(2, 4), layout=layout, encode_values=values)
    mask = torch.rand(out_f, in_f, generator=gen(seed + 1)) < density
    return sparsify(w, mask, layout=layout, encode_values=values)


VALUES = {"fp32": None, "int4-g8": lambda v: quantize(v, QuantScheme(4, False, 8)) if v.dim() == 2 else DenseTensor(v),
          "fp16": lambda v: DenseTensor(v.half())}


@pytest.mark.parametrize("layout", list(SparseLayout))
@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_kernel_equals_decode_then_matmul(layout, values, lead, with_bias):
    enc = sparse(layout=layout, values=values)
    bias = torch.randn(48, generator=gen(2)) if with_bias else None
    x = torch.randn(*lead, 64, generator=gen(3))
    layer = CompressedLinear(enc, bias, Kernel.SPARSE_CSR)
    y = layer(x)
    assert layer.resolved_kernel is Kernel.SPARSE_CSR and y.shape == (*lead, 48)
    ref = F.linear(x, enc.decode(), bias)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * ref.abs().max().item() + 1e-6)


def test_csr_weight_holds_exactly_the_kept_values():
    enc = sparse(density=0.1, layout=SparseLayout.CSR)
    W = csr_weight(enc)
    assert W.layout == torch.sparse_csr and torch.equal(W.to_dense(), enc.decode())
    assert W.values().numel() == enc.nnz


def test_capability_table():
    assert supports(Kernel.SPARSE_CSR, sparse())
    assert not supports(Kernel.SPARSE_CSR, DenseTensor(torch.randn(4, 4)))
    assert not supports(Kernel.SPARSE_CSR, quantize(torch.randn(4, 8), QuantScheme(8)))
    conv = sparsify(torch.randn(4, 2, 3, 3), torch.rand(4, 2, 3, 3, generator=gen(0)) < 0.5)
    assert not supports(Kernel.SPARSE_CSR, conv)  # convolutions decode to dense
    assert not supports(Kernel.INT8_WEIGHT_MM, sparse())
    with pytest.raises(ConfigError, match="cannot run"):
        CompressedLinear(DenseTensor(torch.randn(4, 4)), None, Kernel.SPARSE_CSR)


@pytest.mark.parametrize("fastest", [Kernel.SPARSE_CSR, Kernel.DENSE])
def test_auto_picks_the_sparse_kernel_only_when_measured_faster(monkeypatch, fastest):
    timings = {Kernel.SPARSE_CSR: 2.0, Kernel.DENSE: 1.5, Kernel.DECODE_PER_CALL: 3.0}
    timings[fastest] = 1.0
    timed = []

    def fake_time(fn, x):
        kernel = next(k for k, v in prepared.items() if v is fn)
        timed.append(kernel)
        return timings[kernel]

    prepared = {}
    real_prepare = kernels.prepare

    def spy_prepare(kernel, enc, bias=None):
        prepared[kernel] = real_prepare(kernel, enc, bias)
        return prepared[kernel]

    monkeypatch.setattr(kernels, "_time", fake_time)
    monkeypatch.setattr(kernels, "prepare", spy_prepare)
    monkeypatch.setattr(kernels, "_TIMINGS", {})
    enc = sparse(density=0.05 if fastest is Kernel.SPARSE_CSR else 0.5)
    assert select_kernel(enc) is fastest
    assert set(timed) == {Kernel.SPARSE_CSR, Kernel.DENSE}  # decode-per-call is dense plus a decode: never timed


def test_timings_are_cached_per_density(monkeypatch):
    monkeypatch.setattr(kernels, "_TIMINGS", {})
    first = sparse(density=0.5)
    select_kernel(first, rows=8)
    select_kernel(sparsify(2 * first.decode(), first.mask()), rows=8)  # same shape and density: cached
    select_kernel(sparse(density=0.1), rows=8)
    assert len(kernels._TIMINGS) == 2
