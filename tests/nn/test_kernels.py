"""Kernels: every weight-only path computes decode-then-matmul; dynamic int8 stays within the
error its activation quantisation allows; the capability table; AUTO selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelpress.encodings import DenseTensor, QuantScheme, quantize
from modelpress.encodings import as_matrix, grouped
from modelpress.encodings.quantized import minmax_params
from modelpress.errors import ConfigError
from modelpress.nn import CompressedLinear, Kernel, select_kernel, supports
from modelpress.nn.kernels import WEIGHT_ONLY_KERNELS, prepare


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=gen(seed)) * 0.2


def qenc(out_f: int, in_f: int, bits: int, symmetric: bool, group_size, seed: int = 0):
    return quantize(weight(out_f, in_f, seed) + (0 if symmetric else 0.05), QuantScheme(bits, symmetric, group_size))


def inputs(in_f: int, lead: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*lead, in_f, generator=gen(seed))


def bias_for(out_f: int, with_bias: bool) -> torch.Tensor | None:
    return torch.randn(out_f, generator=gen(2)) if with_bias else None


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-4 * ref.abs().max().item() + 1e-6)


LEADS = [pytest.param((3,), id="2d"), pytest.param((2, 5), id="3d"), pytest.param((), id="1d")]
BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="nobias")]

ANY_ENCODING = {
    "dense-fp32": lambda: DenseTensor(weight(48, 64)),
    "dense-fp16": lambda: DenseTensor(weight(48, 64).half()),
    "int8-sym-channel": lambda: qenc(48, 64, 8, True, "channel"),
    "int8-sym-tensor": lambda: qenc(48, 64, 8, True, "tensor"),
    "int8-asym-g32": lambda: qenc(48, 64, 8, False, 32),
    "int4-asym-g32": lambda: qenc(48, 64, 4, False, 32),
    "int4-sym-channel": lambda: qenc(48, 64, 4, True, "channel"),
    "int3-asym-g16": lambda: qenc(48, 64, 3, False, 16),
    "int2-asym-channel": lambda: qenc(48, 64, 2, False, "channel"),
}


# ---------------------------------------------------------------- weight-only kernels == decode-then-matmul


@pytest.mark.parametrize("kernel", [Kernel.DENSE, Kernel.DECODE_PER_CALL, "dense", "decode"])
@pytest.mark.parametrize("make", ANY_ENCODING.values(), ids=ANY_ENCODING.keys())
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("with_bias", BIAS)
def test_dense_and_decode_kernels_equal_decode_then_matmul_exactly(kernel, make, lead, with_bias):
    enc = make()
    bias = bias_for(48, with_bias)
    x = inputs(64, lead)
    layer = CompressedLinear(enc, bias, kernel)
    y = layer(x)
    assert layer.resolved_kernel is Kernel(kernel)
    assert torch.equal(y, F.linear(x, enc.decode(), bias))  # the same float32 ops: bit-identical


@pytest.mark.parametrize(("out_f", "in_f"), [(5, 16), (48, 64), (33, 128), (1, 8)])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("with_bias", BIAS)
def test_int8_weight_mm_equals_decode_then_matmul(out_f, in_f, lead, with_bias):
    enc = qenc(out_f, in_f, 8, True, "channel", seed=out_f)
    bias = bias_for(out_f, with_bias)
    x = inputs(in_f, lead)
    assert_matches(CompressedLinear(enc, bias, Kernel.INT8_WEIGHT_MM)(x), F.linear(x, enc.decode(), bias))


@pytest.mark.parametrize(("out_f", "in_f", "group_size"),
                         [(16, 32, 32), (16, 128, 32), (32, 128, 64), (48, 256, 128), (16, 256, 256), (64, 384, 128)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("with_bias", BIAS)
def test_int4_weight_mm_equals_decode_then_matmul(out_f, in_f, group_size, symmetric, lead, with_bias):
    enc = qenc(out_f, in_f, 4, symmetric, group_size, seed=in_f)
    bias = bias_for(out_f, with_bias)
    x = inputs(in_f, lead)
    assert_matches(CompressedLinear(enc, bias, Kernel.INT4_WEIGHT_MM)(x), F.linear(x, enc.decode(), bias))


def test_int4_weight_mm_with_fractional_zero_points():
    # MSE-searched asymmetric zeros are fractional; the kernel's (8 - z) * s offset must carry them.
    w = weight(32, 128, 3)
    scheme = QuantScheme(4, False, 32)
    scale, _ = minmax_params(grouped(as_matrix(w), scheme), scheme)
    zero = torch.full_like(scale, 7.375)
    enc = quantize(w, scheme, scale, zero)
    assert bool((enc.zero_points() == 7.375).all())
    x = inputs(128, (4,))
    assert_matches(CompressedLinear(enc, None, Kernel.INT4_WEIGHT_MM)(x), F.linear(x, enc.decode()))


@pytest.mark.parametrize("out_f", [pytest.param(16, id="N16"),
                                   pytest.param(8, id="N8"),
                                   pytest.param(24, id="N24")])
def test_int4_capability_matches_what_runs(out_f):
    # Whatever the capability table says must hold: supported -> correct output; not -> ConfigError.
    enc = qenc(out_f, 64, 4, False, 32)
    x = inputs(64, (3,))
    if supports(Kernel.INT4_WEIGHT_MM, enc):
        assert_matches(CompressedLinear(enc, None, Kernel.INT4_WEIGHT_MM)(x), F.linear(x, enc.decode()))
    else:
        with pytest.raises(ConfigError):
            CompressedLinear(enc, None, Kernel.INT4_WEIGHT_MM)


@pytest.mark.parametrize(
    "out_f",
    [16, pytest.param(8)],
)
def test_auto_runs_every_int4_layer(out_f):
    enc = qenc(out_f, 64, 4, False, 32)
    x = inputs(64, (3,))
    assert_matches(CompressedLinear(enc)(x), F.linear(x, enc.decode()))


# ---------------------------------------------------------------- dynamic int8


def seven_bit(w: torch.Tensor, scheme: QuantScheme):
    """int8 codes with |q| <= 63, as the dynamic_int8 pass stores them (weight_bits=7)."""
    scale, _ = minmax_params(grouped(as_matrix(w), scheme), scheme)
    return quantize(w, scheme, scale * (127 / 63))


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("weight_bits", [7, 8])
@pytest.mark.parametrize("lead", [pytest.param((32,), id="2d"), pytest.param((4, 8), id="3d")])
@pytest.mark.parametrize("with_bias", BIAS)
def test_dynamic_int8_error_is_bounded_by_activation_step(granularity, weight_bits, lead, with_bias):
    scheme = QuantScheme(8, True, granularity)
    w = weight(64, 256, 4)
    enc = seven_bit(w, scheme) if weight_bits == 7 else quantize(w, scheme)
    codes = enc.int_codes().to(torch.int16) - 128
    assert (codes.abs().max() <= 63) == (weight_bits == 7)
    bias = bias_for(64, with_bias)
    x = inputs(256, lead, seed=5) + 0.3
    y = CompressedLinear(enc, bias, Kernel.DYNAMIC_INT8)(x)
    ref = F.linear(x, enc.decode(), bias)
    assert y.shape == ref.shape

    # Activations are quantised per call to one uint8 range covering [min(x, 0), max(x, 0)]: 255
    # steps, or 127 when 8-bit weights force fbgemm's reduced range. Each activation then moves by
    # at most one step (half a step of rounding plus up to half of zero-point rounding and
    # clamping), so output j moves by at most step * sum_k |W_jk| (weights themselves are exact).
    levels = 255 if weight_bits == 7 else 127
    step = (max(x.max().item(), 0.0) - min(x.min().item(), 0.0)) / levels
    W = enc.decode()
    err = (y - ref).abs().reshape(-1, 64)
    worst = step * W.abs().sum(1) + 1e-4 * ref.abs().max().item()
    assert bool((err <= worst).all())
    # And statistically: uniform rounding noise of variance step^2/12 per activation predicts the
    # mean squared error exactly (measured ratio 0.97-1.04); a kernel that did not quantise, or used
    # half the levels it should (4x the variance), falls outside [0.5, 2].
    predicted = step**2 / 12 * W.pow(2).sum(1)
    ratio = (err.pow(2).mean(0) / predicted).mean().item()
    assert 0.5 < ratio < 2.0


def per_token_reference(x: torch.Tensor, W: torch.Tensor, bias, levels: int) -> torch.Tensor:
    """The per-token kernel by hand: rows scaled to max |x| = 1, one asymmetric uint8 range over all of
    them (as fbgemm picks it: `levels` steps from min to max), rounded, scaled back row by row. Codes are
    uint8: with 127 levels the top value may round to code 128, which is kept."""
    m = x.abs().amax(-1, keepdim=True)
    xn = x * m.reciprocal()  # as the kernel scales (x / m can differ by an ulp and round the other way)
    lo, hi = min(xn.min().item(), 0.0), max(xn.max().item(), 0.0)
    scale = (hi - lo) / levels
    zero = round(-lo / scale)
    xq = (torch.clamp(torch.round(xn / scale) + zero, 0, 255) - zero) * scale
    y = F.linear(xq, W) * m
    return y if bias is None else y + bias


@pytest.mark.parametrize("lead", [pytest.param((32,), id="2d"), pytest.param((4, 8), id="3d")])
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("weight_bits", [7, 8])
@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_dynamic_int8_per_token_matches_a_plain_reference(lead, with_bias, weight_bits, shift):
    """`shift` skews x positive (as after GELU): the range must then be the rows' real one, not [-1, 1]."""
    scheme = QuantScheme(8, True, "channel")
    w = weight(64, 256, 4)
    enc = seven_bit(w, scheme) if weight_bits == 7 else quantize(w, scheme)
    levels = 255 if weight_bits == 7 else 127
    bias = bias_for(64, with_bias)
    x = (inputs(256, lead, seed=5) + shift) * torch.logspace(-2, 2, lead[-1]).unsqueeze(-1)  # rows of very different size
    y = CompressedLinear(enc, bias, Kernel.DYNAMIC_INT8_TOKEN)(x)
    W = enc.decode()
    ref = per_token_reference(x, W, bias, levels)
    assert y.shape == F.linear(x, W).shape
    # fbgemm and the reference may round a value at a step's midpoint differently: at most one step
    # of one activation apart, so each row within step * m * sum|W| (and far closer on average).
    m = x.abs().amax(-1, keepdim=True)
    xn = x / m
    step = (max(xn.max().item(), 0.0) - min(xn.min().item(), 0.0)) / levels
    assert bool(((y - ref).abs() <= step * m * W.abs().sum(1) + 1e-5 * ref.abs().max()).all())
    assert (y - ref).abs().mean() < 0.05 * (y - F.linear(x, W, bias)).abs().mean() + 1e-6


def test_dynamic_int8_per_token_keeps_small_tokens_accurate_next_to_a_huge_one():
    """One token 1000x larger than the rest coarsens a per-call range for every token; a range per token
    does not."""
    enc = seven_bit(weight(64, 256, 4), QuantScheme(8, True, "channel"))
    x = inputs(256, (16,), seed=7)
    x[0] *= 1000
    exact = F.linear(x, enc.decode())
    rel = {}
    for kernel in (Kernel.DYNAMIC_INT8, Kernel.DYNAMIC_INT8_TOKEN):
        err = (CompressedLinear(enc, None, kernel)(x) - exact)[1:]
        rel[kernel] = (err.norm() / exact[1:].norm()).item()
    assert rel[Kernel.DYNAMIC_INT8_TOKEN] < 0.02 < rel[Kernel.DYNAMIC_INT8]


def test_dynamic_int8_per_token_handles_all_zero_tokens():
    enc = seven_bit(weight(16, 64), QuantScheme(8, True, "channel"))
    bias = bias_for(16, True)
    x = inputs(64, (3,))
    x[1] = 0
    y = CompressedLinear(enc, bias, Kernel.DYNAMIC_INT8_TOKEN)(x)
    assert torch.isfinite(y).all() and torch.equal(y[1], bias)


def test_dynamic_int8_per_token_takes_no_tokens_and_non_finite_ones():
    """An empty batch gives an empty output; a NaN or inf token gives a non-finite row (as the per-call
    kernel's output does), not an exception from choosing the range."""
    enc = seven_bit(weight(16, 64), QuantScheme(8, True, "channel"))
    layer = CompressedLinear(enc, bias_for(16, True), Kernel.DYNAMIC_INT8_TOKEN)
    assert layer(torch.zeros(0, 64)).shape == (0, 16)
    assert layer(torch.zeros(2, 0, 64)).shape == (2, 0, 16)
    for bad in (float("nan"), float("inf")):
        x = inputs(64, (3,))
        x[1, 5] = bad
        assert not torch.isfinite(layer(x)).all()


# ---------------------------------------------------------------- capability table

CAPABILITY = [
    # (kernel, encoding, supported)
    (Kernel.DENSE, "dense-fp32", True), (Kernel.DENSE, "int2-asym-channel", True), (Kernel.DENSE, "int4-asym-g32", True),
    (Kernel.DECODE_PER_CALL, "dense-fp16", True), (Kernel.DECODE_PER_CALL, "int3-asym-g16", True),
    (Kernel.INT8_WEIGHT_MM, "int8-sym-channel", True),
    (Kernel.INT8_WEIGHT_MM, "int8-sym-tensor", False),
    (Kernel.INT8_WEIGHT_MM, "int8-asym-channel", False),
    (Kernel.INT8_WEIGHT_MM, "int8-sym-g32", False),
    (Kernel.INT8_WEIGHT_MM, "int4-sym-channel", False),
    (Kernel.INT8_WEIGHT_MM, "dense-fp32", False),
    (Kernel.INT8_WEIGHT_MM, "int8-sym-channel-conv", False),
    (Kernel.DYNAMIC_INT8, "int8-sym-channel", True),
    (Kernel.DYNAMIC_INT8, "int8-sym-tensor", True),
    (Kernel.DYNAMIC_INT8, "int8-asym-channel", False),
    (Kernel.DYNAMIC_INT8, "int8-sym-g32", False),
    (Kernel.DYNAMIC_INT8, "int4-sym-channel", False),
    (Kernel.DYNAMIC_INT8, "dense-fp32", False),
    (Kernel.INT4_WEIGHT_MM, "int4-asym-g32", True),
    (Kernel.INT4_WEIGHT_MM, "int4-sym-g64", True),
    (Kernel.INT4_WEIGHT_MM, "int4-asym-g128", True),
    (Kernel.INT4_WEIGHT_MM, "int4-asym-g256", True),
    (Kernel.INT4_WEIGHT_MM, "int4-asym-g16", False),
    (Kernel.INT4_WEIGHT_MM, "int4-sym-channel", False),
    (Kernel.INT4_WEIGHT_MM, "int4-asym-tensor", False),
    (Kernel.INT4_WEIGHT_MM, "int8-sym-g32", False),
    (Kernel.INT4_WEIGHT_MM, "int3-asym-g32", False),
    (Kernel.INT4_WEIGHT_MM, "dense-fp32", False),
    (Kernel.AUTO, "int8-sym-channel", False),  # AUTO is a choice, not a kernel
]

TABLE_ENCODINGS = {
    "dense-fp32": lambda: DenseTensor(weight(16, 256)),
    "dense-fp16": lambda: DenseTensor(weight(16, 256).half()),
    "int8-sym-channel": lambda: qenc(16, 256, 8, True, "channel"),
    "int8-sym-tensor": lambda: qenc(16, 256, 8, True, "tensor"),
    "int8-asym-channel": lambda: qenc(16, 256, 8, False, "channel"),
    "int8-sym-g32": lambda: qenc(16, 256, 8, True, 32),
    "int8-sym-channel-conv": lambda: quantize(torch.randn(16, 4, 2, 2), QuantScheme(8, True, "channel")),
    "int4-sym-channel": lambda: qenc(16, 256, 4, True, "channel"),
    "int4-asym-tensor": lambda: qenc(16, 256, 4, False, "tensor"),
    "int4-asym-g16": lambda: qenc(16, 256, 4, False, 16),
    "int4-asym-g32": lambda: qenc(16, 256, 4, False, 32),
    "int4-sym-g64": lambda: qenc(16, 256, 4, True, 64),
    "int4-asym-g128": lambda: qenc(16, 256, 4, False, 128),
    "int4-asym-g256": lambda: qenc(16, 256, 4, False, 256),
    "int3-asym-g16": lambda: qenc(16, 256, 3, False, 16),
    "int3-asym-g32": lambda: qenc(16, 256, 3, False, 32),
    "int2-asym-channel": lambda: qenc(16, 256, 2, False, "channel"),
}


@pytest.mark.parametrize(("kernel", "name", "expected"), CAPABILITY, ids=[f"{k.value}-{n}" for k, n, _ in CAPABILITY])
def test_capability_table(kernel, name, expected):
    assert supports(kernel, TABLE_ENCODINGS[name]()) is expected


@pytest.mark.parametrize(
    ("kernel", "name"),
    [(k, n) for k, n, ok in CAPABILITY if not ok and k is not Kernel.AUTO and n != "int8-sym-channel-conv"],
    ids=[f"{k.value}-{n}" for k, n, ok in CAPABILITY if not ok and k is not Kernel.AUTO and n != "int8-sym-channel-conv"],
)
def test_unsupported_kernel_raises_config_error(kernel, name):
    enc = TABLE_ENCODINGS[name]()
    with pytest.raises(ConfigError, match=rf"kernel '{kernel.value}' cannot run .*: use kernel 'auto'"):
        CompressedLinear(enc, None, kernel)
    with pytest.raises(ConfigError, match=rf"kernel '{kernel.value}' cannot run"):
        prepare(kernel, enc)


@pytest.mark.parametrize("kernel", ["dense", "int8_mm", "int4_mm", "dynamic_int8", "dynamic_int8_token", "decode"])
def test_supported_kernels_prepare(kernel):
    enc = {"int4_mm": TABLE_ENCODINGS["int4-asym-g32"]}.get(kernel, TABLE_ENCODINGS["int8-sym-channel"])()
    fn = prepare(Kernel(kernel), enc)
    assert fn(torch.zeros(2, 256)).shape == (2, 16)


# ---------------------------------------------------------------- AUTO


@pytest.mark.parametrize(
    "name", ["int8-sym-channel", "int4-asym-g32", "int4-sym-g64", "int3-asym-g16", "dense-fp32", "int8-sym-tensor"]
)
@pytest.mark.parametrize("with_bias", BIAS)
def test_auto_picks_a_weight_only_kernel_and_matches_dense(name, with_bias):
    enc = TABLE_ENCODINGS[name]()
    bias = bias_for(16, with_bias)
    x = inputs(256, (2, 3))
    auto = CompressedLinear(enc, bias)
    assert auto.kernel is Kernel.AUTO and auto.resolved_kernel is None
    y = auto(x)
    assert auto.resolved_kernel in WEIGHT_ONLY_KERNELS
    assert supports(auto.resolved_kernel, enc)
    assert_matches(y, CompressedLinear(enc, bias, Kernel.DENSE)(x))
    assert_matches(y, F.linear(x, enc.decode(), bias))


def test_select_kernel_is_cached_and_never_picks_dynamic_int8():
    enc = TABLE_ENCODINGS["int8-sym-channel"]()
    first = select_kernel(enc, rows=16)
    assert first in WEIGHT_ONLY_KERNELS and first is not Kernel.DYNAMIC_INT8
    assert select_kernel(enc, rows=16) is first


@pytest.mark.parametrize(
    ("name", "candidates", "expected"),
    [("dense-fp32", (Kernel.DENSE, Kernel.INT8_WEIGHT_MM, Kernel.INT4_WEIGHT_MM), Kernel.DENSE),
     ("int3-asym-g16", (Kernel.INT4_WEIGHT_MM, Kernel.DECODE_PER_CALL), Kernel.DECODE_PER_CALL),
     ("int8-sym-channel", (Kernel.INT8_WEIGHT_MM,), Kernel.INT8_WEIGHT_MM)],
)
def test_select_kernel_with_one_eligible_candidate(name, candidates, expected):
    assert select_kernel(TABLE_ENCODINGS[name](), candidates) is expected


def per_row_reference(x: torch.Tensor, enc, bias, levels: int) -> torch.Tensor:
    """The per-row kernel by hand: each row on a symmetric grid of its own, step d = max|x_row| / levels,
    codes q = round(x / d) (half to even), the integer product q W_q^T in int64, then the float operations
    in the kernel's order: * the weight's channel scales, * d, + bias."""
    d = x.abs().amax(-1, keepdim=True) / levels
    q = torch.round(x / d)
    assert q.abs().max() <= levels
    acc = q.to(torch.int64) @ (enc.int_codes().to(torch.int64) - enc.scheme.midpoint).t()
    y = acc.float() * enc.scale.float().reshape(-1) * d
    return y if bias is None else y + bias


@pytest.mark.parametrize("lead", [pytest.param((32,), id="2d"), pytest.param((4, 8), id="3d")])
@pytest.mark.parametrize("with_bias", BIAS)
@pytest.mark.parametrize("weight_bits", [7, 8])
@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_dynamic_int8_per_row_matches_a_plain_reference_bit_for_bit(lead, with_bias, weight_bits, shift):
    """The codes and every float operation are the reference's (the ONNX export relies on it)."""
    scheme = QuantScheme(8, True, "channel")
    w = weight(64, 256, 4)
    enc = seven_bit(w, scheme) if weight_bits == 7 else quantize(w, scheme)
    levels = 127 if weight_bits == 7 else 63  # 7-bit activations beside 8-bit weights (fbgemm's reduce_range)
    bias = bias_for(64, with_bias)
    x = (inputs(256, lead, seed=5) + shift) * torch.logspace(-2, 2, lead[-1]).unsqueeze(-1)
    y = CompressedLinear(enc, bias, Kernel.DYNAMIC_INT8_ROW)(x)
    assert torch.equal(y, per_row_reference(x, enc, bias, levels))
    W = enc.decode()
    assert (y - F.linear(x, W, bias)).norm() < 0.02 * F.linear(x, W).norm()


def test_dynamic_int8_per_row_rows_are_independent_and_zero_rows_give_the_bias():
    """A row's output does not depend on the other rows of the call: alone, or beside a huge one, it gets the
    same bits (so padding never moves a sentence's numbers); an all-zero row gives the bias; NaN stays NaN."""
    enc = seven_bit(weight(64, 256, 4), QuantScheme(8, True, "channel"))
    bias = bias_for(64, True)
    layer = CompressedLinear(enc, bias, Kernel.DYNAMIC_INT8_ROW)
    x = inputs(256, (6,), seed=3)
    x[2] *= 1000
    x[4] = 0
    many = layer(x)
    for i in range(6):
        assert torch.equal(layer(x[i:i + 1]), many[i:i + 1])
    assert torch.equal(many[4], bias)
    assert layer(torch.zeros(0, 256)).shape == (0, 64)
    x[1, 5] = float("nan")
    assert not torch.isfinite(layer(x)[1]).all()
