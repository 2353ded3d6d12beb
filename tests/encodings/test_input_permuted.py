"""Input-permuted encoding (GPTQ act order): W[:, order[j]] = inner[:, j]; round-trips exactly through
meta()/arrays(), refuses hostile parts with a FormatError, and every kernel that runs it computes x W^T."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.encodings import InputPermutedTensor, QuantScheme, encoding_from_parts, quantize
from modelpress.errors import ConfigError, FormatError
from modelpress.nn.kernels import Kernel, select_kernel, supports
from modelpress.nn.modules import CompressedLinear


def make(rows: int = 6, cols: int = 16, seed: int = 0, bits: int = 4, symmetric: bool = False) -> InputPermutedTensor:
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits, symmetric, 8 if cols % 8 == 0 else "channel")
    inner = quantize(torch.randn(rows, cols, generator=g), scheme)
    return InputPermutedTensor(inner, torch.randperm(cols, generator=g))


def test_decode_puts_inner_column_j_at_column_order_j():
    enc = make()
    inner = enc.inner.decode()
    w = enc.decode()
    for j, c in enumerate(enc.order.tolist()):
        assert torch.equal(w[:, c], inner[:, j])
    assert enc.decode(torch.float16).dtype == torch.float16 and enc.shape == (6, 16)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 20), seed=st.integers(0, 10**6), bits=st.sampled_from([2, 3, 4, 8]))
def test_round_trip_is_exact(rows, cols, seed, bits):
    enc = make(rows, cols, seed, bits)
    back = encoding_from_parts(json.loads(json.dumps(enc.meta())), {k: v.clone() for k, v in enc.arrays().items()})
    assert isinstance(back, InputPermutedTensor)
    assert torch.equal(back.decode(), enc.decode()) and torch.equal(back.order, enc.order)
    assert back.meta() == enc.meta()


def test_arrays_hold_the_order_and_the_inner_parts():
    enc = make()
    assert set(enc.arrays()) == {"order", "inner.codes", "inner.scale", "inner.zero"}
    assert enc.nbytes == enc.inner.nbytes + 16 * 8


@pytest.mark.parametrize("order, message", [
    (torch.arange(15), "15 entries for 16"),
    (torch.arange(16, dtype=torch.int32), "1-D int64"),
    (torch.zeros(16, dtype=torch.int64), "not a permutation"),
    (torch.arange(1, 17), "not a permutation"),
])
def test_invalid_construction_is_a_config_error(order, message):
    with pytest.raises(ConfigError, match=message):
        InputPermutedTensor(make().inner, order)


def test_nesting_is_refused():
    with pytest.raises(ConfigError, match="inner weight must be"):
        InputPermutedTensor(make(), torch.arange(16))


@pytest.mark.parametrize("meta_change, arrays_change, message", [
    (lambda m: m.update(inner={"kind": "input_permuted", "shape": [6, 16]}), None, "inner encoding of kind"),
    (lambda m: m.update(inner="quantized"), None, "inner encoding of kind"),
    (lambda m: m.update(shape=[16, 6]), None, "inner shape"),
    (None, lambda a: a.pop("order"), "missing its 'order'"),
    (None, lambda a: a.update(order=torch.arange(16).flip(0)[:8]), "8 entries for 16"),
    (None, lambda a: a.update(order=torch.full((16,), 3)), "not a permutation"),
    (None, lambda a: a.update(order=torch.arange(16) - 1), "not a permutation"),
    (None, lambda a: a.update(extra=torch.ones(1)), "unexpected arrays"),
    (None, lambda a: a.pop("inner.codes"), "codes"),
])
def test_hostile_parts_are_format_errors(meta_change, arrays_change, message):
    enc = make()
    meta, arrays = json.loads(json.dumps(enc.meta())), dict(enc.arrays())
    if meta_change:
        meta_change(meta)
    if arrays_change:
        arrays_change(arrays)
    with pytest.raises(FormatError, match=message):
        encoding_from_parts(meta, arrays)


@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (8, True)])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_every_kernel_that_runs_it_computes_x_w_transposed(bits, symmetric, rows):
    enc = make(rows=24, cols=32, seed=bits, bits=bits, symmetric=symmetric)
    bias = torch.randn(24)
    x = torch.randn(rows, 32)
    expected = x.double() @ enc.decode().double().t() + bias.double()
    kernels = [k for k in Kernel if k is not Kernel.AUTO and supports(k, enc)]
    assert Kernel.QMATMUL in kernels and Kernel.DENSE in kernels
    assert not supports(Kernel.INT4_WEIGHT_MM, enc) and not supports(Kernel.INT8_WEIGHT_MM, enc)
    for kernel in kernels:
        y = CompressedLinear(enc, bias, kernel)(x)
        torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5, msg=kernel.value)
    assert select_kernel(enc, rows=rows) in kernels
