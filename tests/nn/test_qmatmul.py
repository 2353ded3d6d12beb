"""Kernel.QMATMUL (nn/qmatmul.py, nn/_qmatmul.c): every path equals decode-then-matmul on odd shapes,
outputs do not depend on row batching or thread count, nothing is decoded ahead of time, and AUTO
picks it by rule (the C entry points and the pool: test_qmatmul_native.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelpress.encodings import DenseTensor, QuantizedTensor, QuantScheme, quantize
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.nn import CompressedEmbedding, CompressedLinear, Kernel, select_kernel, supports
from modelpress.nn import qmatmul
from modelpress.nn.kernels import prepare

PATHS = qmatmul.paths()
NATIVE_PATHS = [p for p in PATHS if p != "torch"]
native_only = pytest.mark.skipif(not qmatmul.NATIVE_AVAILABLE, reason="the C extension is not built here")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qenc(out_f: int, in_f: int, bits: int, symmetric: bool, group_size, seed: int = 0) -> QuantizedTensor:
    w = torch.randn(out_f, in_f, generator=gen(seed)) * 0.2 + (0 if symmetric else 0.03)
    return quantize(w, QuantScheme(bits, symmetric, group_size))


def reference(x: torch.Tensor, enc: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Decode, then the plain float64 product (so the bound below is the kernel's own error)."""
    y = F.linear(x.double(), enc.decode().double(), None if bias is None else bias.double())
    return y.float()


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, enc: QuantizedTensor, bias) -> None:
    ref = reference(x, enc, bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # float32 sums of K products: error within a few ulps of sum |x_k w_k| per output
    bound = 1e-6 * (x.abs().double() @ enc.decode().abs().double().t()).float() * enc.shape[1] ** 0.5 + 1e-6
    assert bool(((y - ref).abs() <= bound.reshape(y.shape)).all())


SCHEMES = [  # (bits, symmetric, group_size)
    (8, True, "channel"), (8, False, "channel"), (8, True, 32), (4, True, 32), (4, True, 64), (4, True, 128),
    (4, False, 32), (4, True, "channel"), (3, True, 16), (3, False, 64), (2, False, 8), (2, False, "channel"),
]
SCHEME_IDS = [f"{b}{'s' if s else 'a'}{g}" for b, s, g in SCHEMES]
SHAPES = [(1, 8), (7, 64), (33, 128), (48, 256)]  # (N, K): N odd or 1, K = 8 (one chunk) up to 256


@pytest.fixture(params=PATHS)
def path(request):
    with qmatmul.use_path(request.param):
        yield request.param


CASES = [pytest.param(scheme, shape, id=f"{scheme[0]}{'s' if scheme[1] else 'a'}{scheme[2]}-{shape[0]}x{shape[1]}")
         for scheme in SCHEMES for shape in SHAPES if not isinstance(scheme[2], int) or shape[1] % scheme[2] == 0]


@pytest.mark.parametrize(("scheme", "shape"), CASES)
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9, 64])
def test_every_path_equals_decode_then_matmul(path, scheme, shape, rows):
    (bits, symmetric, group_size), (out_f, in_f) = scheme, shape
    enc = qenc(out_f, in_f, bits, symmetric, group_size, seed=out_f + in_f)
    bias = torch.randn(out_f, generator=gen(3)) if rows % 2 else None
    x = torch.randn(rows, in_f, generator=gen(rows))
    assert_close_to_reference(CompressedLinear(enc, bias, Kernel.QMATMUL)(x), x, enc, bias)


@pytest.mark.parametrize("in_f", [1, 3, 13, 61, 200])  # per channel: K not a multiple of the 8-code chunk
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_per_channel_rows_with_a_tail(path, in_f, bits, rows):
    enc = qenc(5, in_f, bits, bits > 2, "channel", seed=in_f)
    x = torch.randn(rows, in_f, generator=gen(1))
    assert_close_to_reference(CompressedLinear(enc, None, Kernel.QMATMUL)(x), x, enc, None)


@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (2, 1, 3)], ids=["1d", "2d", "3d", "4d"])
def test_input_shapes_dtypes_and_strides(path, lead):
    enc = qenc(24, 64, 4, True, 32)
    layer = CompressedLinear(enc, torch.randn(24, generator=gen(2)), Kernel.QMATMUL)
    x = torch.randn(*lead, 64, generator=gen(4))
    y = layer(x)
    assert y.shape == (*lead, 24)
    assert_close_to_reference(y.reshape(-1, 24), x.reshape(-1, 64), enc, layer.bias.data)
    wide = torch.randn(*lead, 128, generator=gen(4))[..., ::2]  # a non-contiguous view
    assert_close_to_reference(layer(wide).reshape(-1, 24), wide.reshape(-1, 64), enc, layer.bias.data)
    assert torch.equal(layer(x.double()), y)
    with torch.inference_mode():
        assert torch.equal(layer(x), y)
    assert layer(torch.zeros(0, 64)).shape == (0, 24)


@native_only
@pytest.mark.parametrize("native", NATIVE_PATHS)
@pytest.mark.parametrize(("bits", "group_size"), [(8, "channel"), (4, 32), (3, 16), (4, "channel")])
def test_outputs_do_not_depend_on_batching_method_or_threads(native, bits, group_size):
    """Each output is summed in one fixed order: alone (decode, fused) or in a batch (prefill, tiled),
    on 1, 2 or 3 threads, a token's row is bit-identical."""
    enc = qenc(67, 96 if group_size != "channel" else 93, bits, True, group_size)
    x = torch.randn(13, enc.shape[1], generator=gen(5))
    layer = CompressedLinear(enc, torch.randn(67, generator=gen(6)), Kernel.QMATMUL)
    with qmatmul.use_path(native):
        torch.set_num_threads(1)
        batch = layer(x)
        alone = torch.cat([layer(row).unsqueeze(0) for row in x])
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(layer(x), batch) and torch.equal(layer(x[:3]), batch[:3])
    assert torch.equal(alone, batch)


@native_only
@pytest.mark.parametrize("native", NATIVE_PATHS)
@pytest.mark.parametrize(("bits", "group_size", "in_f"), [(4, 32, 96), (8, "channel", 61), (3, 16, 64)])
def test_without_row_buffers_the_results_are_the_same(native, bits, group_size, in_f):
    """Where malloc fails the kernels still run (tiled as fused, scalar weight by weight): same outputs."""
    from modelpress.nn import _qmatmul

    enc = qenc(19, in_f, bits, False, group_size)
    layer = CompressedLinear(enc, torch.randn(19, generator=gen(1)), Kernel.QMATMUL)
    x = torch.randn(7, in_f, generator=gen(2))  # 7 rows: the tiled method
    with qmatmul.use_path(native):
        expected = layer(x)
        _qmatmul._scratch(0)
        try:
            without = layer(x)
        finally:
            _qmatmul._scratch(1)
    assert torch.equal(without, expected)


@native_only
def test_the_c_paths_agree_to_rounding():
    enc = qenc(40, 256, 4, True, 32)
    x = torch.randn(6, 256, generator=gen(7))
    out = {}
    for native in NATIVE_PATHS:
        with qmatmul.use_path(native):
            out[native] = CompressedLinear(enc, None, Kernel.QMATMUL)(x)
    for y in out.values():
        torch.testing.assert_close(y, out[NATIVE_PATHS[0]], rtol=1e-5, atol=1e-5)


@native_only
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("native", NATIVE_PATHS)
@pytest.mark.parametrize(("bits", "symmetric", "group_size"), SCHEMES, ids=SCHEME_IDS)
def test_the_c_kernel_decodes_exactly_as_the_encoding_does(native, bits, symmetric, group_size, threads):
    """What the kernels multiply by is bit for bit QuantizedTensor.decode (rows 2..8 of 9 here), on one
    thread or split between the pool's threads."""
    from modelpress.nn import _qmatmul

    in_f = 128 if isinstance(group_size, int) else 61
    enc = qenc(9, in_f, bits, symmetric, group_size, seed=bits)
    out = torch.empty(6, in_f)
    gs = 0 if group_size == "channel" else group_size
    zero = None if enc.zero is None else enc.zero.numpy()
    with qmatmul.use_path(native):
        _qmatmul.decode_rows(out.numpy(), enc.codes.numpy(), enc.scale.numpy(), zero, 9, in_f, bits, gs, 2, 8, threads)
    assert torch.equal(out, enc.decode()[2:8])


@native_only
@pytest.mark.parametrize("rows", [qmatmul.BLAS_MIN_ROWS, 40])
def test_many_rows_multiply_decoded_blocks_with_blas(monkeypatch, rows):
    monkeypatch.setattr(qmatmul, "_TILE_FLOATS", 5 * 96)  # 5 weight rows per block: 7 blocks for 33 rows
    enc = qenc(33, 96, 4, True, 32)
    bias = torch.randn(33, generator=gen(4))
    x = torch.randn(rows, 96, generator=gen(5))
    y = CompressedLinear(enc, bias, Kernel.QMATMUL)(x)
    assert_close_to_reference(y, x, enc, bias)
    torch.testing.assert_close(y, F.linear(x, enc.decode(), bias), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_a_channel_scaled_weight_multiplies_its_input_first(path, rows):
    """AWQ/SmoothQuant scales no op absorbed: W_eff = inner * input_scale, run as (x * input_scale) inner^T."""
    inner = qenc(24, 64, 4, True, 32)
    enc = ChannelScaledTensor(inner, torch.rand(64, generator=gen(3)) + 0.5)
    x = torch.randn(rows, 64, generator=gen(4))
    layer = CompressedLinear(enc, None, Kernel.QMATMUL)
    ref = F.linear(x.double(), enc.decode().double()).float()
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)


def test_gradients_flow_to_the_input(path):
    """A layer trained before this one (centroid fine-tuning, QAT) needs d loss / d x through it."""
    enc = qenc(24, 64, 4, True, 32)
    bias = torch.randn(24, generator=gen(2))
    layer = CompressedLinear(enc, bias, Kernel.QMATMUL)
    x = torch.randn(5, 64, generator=gen(3), requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, enc.decode(), bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.no_grad():
        assert_close_to_reference(layer(x), x.detach(), enc, bias)


def test_the_fallback_decodes_block_by_block(monkeypatch):
    monkeypatch.setattr(qmatmul, "_FALLBACK_BLOCK_FLOATS", 3 * 64)  # 3 rows per block: 5 blocks for 13 rows
    enc = qenc(13, 64, 4, True, 32)
    decoded = []
    real = QuantizedTensor.decode_rows
    monkeypatch.setattr(QuantizedTensor, "decode_rows", lambda self, i, *a: decoded.append(len(i)) or real(self, i, *a))
    x = torch.randn(4, 64, generator=gen(8))
    with qmatmul.use_path("torch"):
        y = CompressedLinear(enc, torch.randn(13, generator=gen(9)), Kernel.QMATMUL)(x)
    assert decoded == [3, 3, 3, 3, 1]
    assert_close_to_reference(y, x, enc, CompressedLinear(enc, torch.randn(13, generator=gen(9))).bias.data)


# ---------------------------------------------------------------- memory: nothing decoded ahead of time


def test_no_float_copy_of_the_weight_is_kept_or_made(monkeypatch):
    enc = qenc(64, 128, 4, True, 32)
    layer = CompressedLinear(enc, None, Kernel.QMATMUL)
    monkeypatch.setattr(QuantizedTensor, "decode", lambda *a, **k: pytest.fail("the whole weight was decoded"))
    monkeypatch.setattr(QuantizedTensor, "decode_rows", lambda *a, **k: pytest.fail("rows were decoded"))
    if qmatmul.NATIVE_AVAILABLE:
        layer(torch.randn(1, 128))
        layer(torch.randn(9, 128))
    held = [c.cell_contents for run in layer._runs.values() for c in run.__closure__ or ()]
    tensors = [t for t in held if isinstance(t, torch.Tensor)]
    tensors += [t for h in held if isinstance(h, tuple) for t in h if t is not None]
    assert all(getattr(t, "dtype", None) != torch.float32 or t.numel() < 64 * 128 for t in tensors)


def test_a_tied_table_is_gathered_and_multiplied_without_decoding_it(monkeypatch):
    """One 4-bit g32 encoding serves an embedding (rows gathered) and an output layer (QMATMUL)."""
    enc = qenc(96, 64, 4, True, 32)
    table, lm_head = CompressedEmbedding(enc), CompressedLinear(enc, None, Kernel.QMATMUL)
    ids = torch.tensor([[3, 95, 0, 3]])
    expected_rows = enc.decode()[ids]
    monkeypatch.setattr(QuantizedTensor, "decode", lambda *a, **k: pytest.fail("the whole table was decoded"))
    h = table(ids)
    assert torch.equal(h, expected_rows)
    if qmatmul.NATIVE_AVAILABLE:
        assert lm_head(h).shape == (1, 4, 96)
    assert lm_head.encoding is table.encoding


# ---------------------------------------------------------------- capability and AUTO


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: qenc(8, 64, 4, True, 32), True),
    (lambda: qenc(8, 64, 4, False, 16), True),
    (lambda: qenc(8, 60, 8, True, "channel"), True),
    (lambda: qenc(8, 48, 4, True, 12), False),  # groups must be whole 8-code chunks
    (lambda: ChannelScaledTensor(qenc(8, 64, 4, True, 32), torch.ones(64)), True),
    (lambda: ChannelScaledTensor(DenseTensor(torch.randn(8, 64)), torch.ones(64)), False),
    (lambda: qenc(8, 64, 8, True, "tensor"), False),
    (lambda: DenseTensor(torch.randn(8, 64)), False),
    (lambda: quantize(torch.randn(8, 4, 2, 2), QuantScheme(8, True, "channel")), False),  # a conv weight
])
def test_capability(make, expected):
    assert supports(Kernel.QMATMUL, make()) is expected


@native_only
@pytest.mark.parametrize("rows", [1, 64, 512])
def test_auto_picks_qmatmul_by_rule_for_every_row_count(monkeypatch, rows):
    from modelpress.nn import kernels

    monkeypatch.setattr(kernels, "_time", lambda *a: pytest.fail("QMATMUL's choice must not be timed"))
    assert select_kernel(qenc(16, 64, 4, True, 32), rows=rows) is Kernel.QMATMUL
    assert select_kernel(qenc(16, 64, 8, True, "channel"), rows=rows) is Kernel.QMATMUL


@native_only
def test_auto_module_prepares_one_kernel_for_decode_and_prefill():
    layer = CompressedLinear(qenc(16, 64, 4, True, 32))
    layer(torch.randn(1, 64))
    layer(torch.randn(2, 7, 64))
    assert layer.resolved_kernel is Kernel.QMATMUL
    assert layer._runs[True] is layer._runs[False]  # shared, not prepared twice


def test_auto_times_what_has_no_rule_interleaved_per_row_count(monkeypatch):
    """A kernel with no rule is timed round by round, separately for decode (1 row) and prefill rows;
    decode-per-call is never timed against dense (it is dense plus a decode)."""
    from modelpress.nn import kernels

    enc = qenc(16, 64, 8, True, "channel")
    calls = []
    speed = {1: {Kernel.DENSE: 2.0, Kernel.INT8_WEIGHT_MM: 1.0}, 64: {Kernel.DENSE: 1.0, Kernel.INT8_WEIGHT_MM: 2.0}}

    def fake_time(fn, x):
        kernel = Kernel.DENSE if fn is prepared[Kernel.DENSE] else Kernel.INT8_WEIGHT_MM
        calls.append(kernel)
        return speed[x.shape[0]][kernel]

    prepared = {}
    real_prepare = kernels.prepare
    monkeypatch.setattr(kernels, "prepare", lambda k, e, b=None: prepared.setdefault(k, real_prepare(k, e, b)))
    monkeypatch.setattr(kernels, "_time", fake_time)
    candidates = (Kernel.DENSE, Kernel.INT8_WEIGHT_MM, Kernel.DECODE_PER_CALL)
    assert select_kernel(enc, candidates, rows=1) is Kernel.INT8_WEIGHT_MM
    assert calls[:4] == [Kernel.DENSE, Kernel.INT8_WEIGHT_MM] * 2  # interleaved
    assert Kernel.DECODE_PER_CALL not in prepared
    prepared.clear()
    assert select_kernel(enc, candidates, rows=64) is Kernel.DENSE


def test_prepare_builds_qmatmul_only_where_supported():
    with pytest.raises(Exception, match="cannot run"):
        prepare(Kernel.QMATMUL, DenseTensor(torch.randn(4, 8)))


def test_without_the_extension_auto_keeps_the_measured_choice(monkeypatch):
    """No C compiler at install: QMATMUL still runs (the PyTorch fallback) but AUTO does not pick it by rule."""
    from modelpress.nn import kernels

    monkeypatch.setattr(kernels, "NATIVE_AVAILABLE", False)
    monkeypatch.setattr(kernels, "_TIMINGS", {})
    enc = qenc(16, 64, 4, True, 32)
    assert select_kernel(enc) is Kernel.DENSE  # the conftest clock makes every candidate equally fast
    assert supports(Kernel.QMATMUL, enc)
