"""The low-rank kernel and conv path: both equal decode-then-run; the capability table admits only
2-D low-rank weights; AUTO picks the factors exactly when r (R + C) < R C, decode-once dense
otherwise, and leaves every other encoding's choice alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import DenseTensor, LowRankTensor, QuantScheme, quantize, sparsify
from modelpress.errors import ConfigError
from modelpress.nn import CompressedConv2d, CompressedLinear, Kernel, select_kernel, supports
from modelpress.nn.kernels import WEIGHT_ONLY_KERNELS, prepare


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lowrank(shape: tuple[int, ...], rank: int, bits: int | None = None, seed: int = 0) -> LowRankTensor:
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    left = torch.randn(rows, rank, generator=gen(seed)) * 0.3
    right = torch.randn(rank, cols, generator=gen(seed + 1)) * 0.3
    if bits is None:
        return LowRankTensor(DenseTensor(left), DenseTensor(right), shape)
    group = 8 if cols % 8 == 0 else 9
    return LowRankTensor(quantize(left, QuantScheme(bits, False)), quantize(right, QuantScheme(bits, False, group)), shape)


def assert_close_to(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 summation order (the product is grouped differently)."""
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * ref.abs().max().item() + 1e-6)


# ---------------------------------------------------------------- Linear


@pytest.mark.parametrize("bits", [None, 4, 8], ids=["fp32", "int4", "int8"])
@pytest.mark.parametrize("lead", [(3,), (2, 5), ()], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_low_rank_kernel_equals_decode_then_matmul(bits, lead, with_bias):
    enc = lowrank((48, 64), rank=6, bits=bits)
    bias = torch.randn(48, generator=gen(2)) if with_bias else None
    x = torch.randn(*lead, 64, generator=gen(3))
    layer = CompressedLinear(enc, bias, "low_rank")
    y = layer(x)
    assert layer.resolved_kernel is Kernel.LOW_RANK
    assert_close_to(y, x @ enc.decode().T + (0 if bias is None else bias))
    left, right = enc.factors()
    assert torch.equal(y, F.linear(F.linear(x, right), left, bias))  # the two products, nothing else


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: lowrank((48, 64), 6), True),
    (lambda: lowrank((48, 64), 6, bits=4), True),
    (lambda: lowrank((8, 2, 3, 3), 2), False),  # a conv weight: CompressedConv2d runs it
    (lambda: DenseTensor(torch.randn(48, 64)), False),
    (lambda: quantize(torch.randn(48, 64), QuantScheme(8, True)), False),
    (lambda: sparsify(torch.randn(48, 64), torch.rand(48, 64, generator=gen(0)) < 0.5), False),
], ids=["lowrank", "lowrank-int4", "lowrank-4d", "dense", "int8", "sparse"])
def test_capability_table(make, expected):
    enc = make()
    assert supports(Kernel.LOW_RANK, enc) is expected
    if len(enc.shape) == 2:
        assert supports(Kernel.DENSE, enc) and supports(Kernel.DECODE_PER_CALL, enc)


def test_low_rank_kernel_refuses_other_encodings():
    with pytest.raises(ConfigError, match="kernel 'low_rank' cannot run .*: use kernel 'auto'"):
        CompressedLinear(DenseTensor(torch.randn(4, 8)), None, "low_rank")
    with pytest.raises(ConfigError, match="kernel 'low_rank' cannot run"):
        prepare(Kernel.LOW_RANK, quantize(torch.randn(4, 8), QuantScheme(8)))


@pytest.mark.parametrize(("rows", "cols", "rank"), [(48, 64, 1), (48, 64, 27), (48, 64, 28), (48, 64, 48),
                                                    (384, 384, 191), (384, 384, 192), (1536, 384, 307),
                                                    (1536, 384, 308), (10, 3, 3)])
def test_auto_picks_factors_exactly_when_they_are_cheaper(rows, cols, rank):
    enc = lowrank((rows, cols), rank)
    expected = Kernel.LOW_RANK if rank * (rows + cols) < rows * cols else Kernel.DENSE
    assert select_kernel(enc) is expected
    layer = CompressedLinear(enc)
    x = torch.randn(4, cols, generator=gen(5))
    assert_close_to(layer(x), x @ enc.decode().T)
    assert layer.resolved_kernel is expected


def test_auto_without_the_preferred_candidates_falls_back():
    enc = lowrank((48, 64), 4)
    assert select_kernel(enc, (Kernel.DENSE, Kernel.DECODE_PER_CALL)) is Kernel.DENSE
    assert select_kernel(enc, (Kernel.DECODE_PER_CALL,)) is Kernel.DECODE_PER_CALL


@pytest.mark.parametrize("make", [lambda: DenseTensor(torch.randn(48, 64)),
                                  lambda: quantize(torch.randn(48, 64), QuantScheme(8, True)),
                                  lambda: quantize(torch.randn(48, 64), QuantScheme(4, False, 32))],
                         ids=["dense", "int8", "int4"])
def test_other_encodings_never_see_the_low_rank_kernel(make):
    enc = make()
    eligible = [k for k in WEIGHT_ONLY_KERNELS if supports(k, enc)]
    assert Kernel.LOW_RANK not in eligible
    assert select_kernel(enc, rows=8) in eligible


# ---------------------------------------------------------------- Conv2d


GEOMETRIES = {
    "plain": {},
    "stride-padding": {"stride": 2, "padding": 1},
    "asymmetric": {"stride": (2, 1), "padding": (0, 2), "dilation": (1, 2)},
    "same": {"padding": "same", "dilation": 2},
}


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("bits", [None, 4], ids=["fp32", "int4"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv_runs_two_convolutions_equal_to_the_decoded_conv(geometry, bits, with_bias):
    enc = lowrank((12, 6, 3, 3), rank=4, bits=bits)  # 4 (12 + 54) < 12 * 54
    bias = torch.randn(12, generator=gen(4)) if with_bias else None
    conv = CompressedConv2d(enc, bias, **geometry)
    x = torch.randn(2, 6, 9, 10, generator=gen(6))
    assert conv.runs_factors
    y = conv(x)
    assert conv._dense is None and conv._factors is not None  # the factors ran, not the decoded weight
    reference = F.conv2d(x, enc.decode(), bias, conv.stride, conv.padding, conv.dilation)
    assert_close_to(y, reference)
    conv.release()
    assert conv._factors is None
    assert_close_to(conv(x), reference)


@pytest.mark.parametrize(("shape", "rank", "groups"), [((12, 6, 1, 1), 4, 1), ((12, 3, 3, 3), 2, 2)],
                         ids=["not-cheaper", "grouped"])
def test_conv_decodes_once_where_factors_do_not_pay_or_groups_mix(shape, rank, groups):
    enc = lowrank(shape, rank=rank)  # 4 (12 + 6) >= 12 * 6 ; a grouped conv has no two-conv form here
    conv = CompressedConv2d(enc, None, padding=1, groups=groups)
    x = torch.randn(2, shape[1] * groups, 7, 7, generator=gen(7))
    assert not conv.runs_factors
    assert torch.equal(conv(x), F.conv2d(x, enc.decode(), None, 1, 1, 1, groups))
    assert conv._dense is not None


def test_conv_low_rank_matches_a_torch_conv_with_the_same_weight():
    torch.manual_seed(0)
    reference = nn.Conv2d(5, 8, 3, stride=1, padding=1)
    left = torch.randn(8, 2)
    right = torch.randn(2, 45)
    with torch.no_grad():
        reference.weight.copy_((left @ right).reshape(8, 5, 3, 3))
    enc = LowRankTensor(DenseTensor(left), DenseTensor(right), (8, 5, 3, 3))
    conv = CompressedConv2d.from_conv(reference, enc)
    x = torch.randn(3, 5, 6, 6)
    assert_close_to(conv(x), reference(x).detach())
