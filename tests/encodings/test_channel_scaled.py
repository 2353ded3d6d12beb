"""Channel-scaled encoding: decodes to inner * input_scale column by column, round-trips exactly
through meta()/arrays() (JSON metadata), and refuses hostile parts with a FormatError."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.encodings import DenseTensor, QuantScheme, encoding_from_parts, quantize
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.errors import ConfigError, FormatError


def make(rows: int = 6, cols: int = 8, seed: int = 0, quantised: bool = True) -> ChannelScaledTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    inner = quantize(w, QuantScheme(4, False, 4 if cols % 4 == 0 else "channel")) if quantised else DenseTensor(w)
    return ChannelScaledTensor(inner, torch.rand(cols, generator=g) * 3 + 0.1)


def round_trip(enc: ChannelScaledTensor) -> ChannelScaledTensor:
    meta = json.loads(json.dumps(enc.meta()))
    back = encoding_from_parts(meta, {k: v.clone() for k, v in enc.arrays().items()})
    assert isinstance(back, ChannelScaledTensor)
    return back


@pytest.mark.parametrize("quantised", [True, False])
def test_decode_is_the_inner_weight_times_the_input_scale_per_column(quantised):
    enc = make(quantised=quantised)
    inner = enc.inner.decode(torch.float32)
    expected = torch.stack([inner[:, j] * enc.input_scale[j] for j in range(inner.shape[1])], dim=1)
    assert torch.equal(enc.decode(), expected)
    assert enc.shape == (6, 8) and enc.decode(torch.float16).dtype == torch.float16


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 12), seed=st.integers(0, 10**6), quantised=st.booleans())
def test_round_trip_is_exact(rows, cols, seed, quantised):
    enc = make(rows, cols, seed, quantised)
    back = round_trip(enc)
    assert torch.equal(back.decode(), enc.decode())
    assert torch.equal(back.input_scale, enc.input_scale)
    assert back.meta() == enc.meta()


def test_arrays_and_bytes_include_the_scale():
    enc = make(quantised=True)
    assert set(enc.arrays()) == {"input_scale", "inner.codes", "inner.scale", "inner.zero"}
    assert enc.nbytes == enc.inner.nbytes + 8 * 4


@pytest.mark.parametrize("scale, message", [
    (torch.ones(7), "7 entries for 8"),
    (torch.ones(8, dtype=torch.float64), "1-D float32"),
    (torch.ones(1, 8), "1-D float32"),
    (torch.tensor([1.0] * 7 + [0.0]), "non-positive"),
    (torch.tensor([1.0] * 7 + [float("nan")]), "non-finite"),
])
def test_invalid_construction_is_a_config_error(scale, message):
    with pytest.raises(ConfigError, match=message):
        ChannelScaledTensor(DenseTensor(torch.zeros(3, 8)), scale)


def test_nesting_is_refused():
    enc = make()
    with pytest.raises(ConfigError, match="inner weight must be"):
        ChannelScaledTensor(enc, torch.ones(8))


def _hostile(enc: ChannelScaledTensor, meta_change=None, arrays_change=None):
    meta = json.loads(json.dumps(enc.meta()))
    arrays = dict(enc.arrays())
    if meta_change:
        meta_change(meta)
    if arrays_change:
        arrays_change(arrays)
    return encoding_from_parts(meta, arrays)


@pytest.mark.parametrize("meta_change, arrays_change, message", [
    (lambda m: m.update(inner={"kind": "channel_scaled", "shape": [6, 8]}), None, "inner encoding of kind"),
    (lambda m: m.update(inner="quantized"), None, "inner encoding of kind"),
    (lambda m: m.update(shape=[8, 6]), None, "inner shape"),
    (None, lambda a: a.pop("input_scale"), "missing its 'input_scale'"),
    (None, lambda a: a.update(input_scale=torch.ones(5)), "5 entries for 8"),
    (None, lambda a: a.update(input_scale=-torch.ones(8)), "non-positive"),
    (None, lambda a: a.update(input_scale=torch.ones(8, dtype=torch.float16)), "1-D float32"),
    (None, lambda a: a.update(extra=torch.ones(1)), "unexpected arrays"),
    (None, lambda a: a.pop("inner.codes"), "codes"),
])
def test_hostile_parts_are_format_errors(meta_change, arrays_change, message):
    with pytest.raises(FormatError, match=message):
        _hostile(make(), meta_change, arrays_change)
