"""Quantised encoding: scheme validation, quantize() against a plain loop reference, error bounds,
row decoding, and meta()/arrays() round trips including hostile parts.

The reference below re-derives the module docstring's formulas one group at a time in numpy
float32. Every step is a single IEEE float32 (or float16-rounding) operation in the same order as
the module's, so decoded tensors must agree bit for bit; no tolerance is needed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modelpress.encodings import (
    PER_CHANNEL,
    PER_TENSOR,
    QuantizedTensor,
    QuantScheme,
    encoding_from_parts,
    packed_row_bytes,
    quantize,
)
from modelpress.errors import ConfigError, FormatError

F32 = np.float32


def reference_quantize(w: np.ndarray, bits: int, symmetric: bool, group_size: int):
    """(codes, scale, zero, decoded), each (R, C) per element, by looping over rows and groups."""
    w = np.asarray(w, dtype=F32)
    m = w.reshape(1, -1) if w.ndim <= 1 else w.reshape(w.shape[0], -1)
    rows, cols = m.shape
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    codes = np.zeros(m.shape, dtype=np.int64)
    scale = np.zeros(m.shape, dtype=F32)
    zero = np.zeros(m.shape, dtype=F32)
    if group_size == PER_TENSOR:
        groups = [(slice(None), slice(None))]
    else:
        gs = cols if group_size == PER_CHANNEL else group_size
        groups = [(r, slice(g, g + gs)) for r in range(rows) for g in range(0, cols, gs)]
    for r, cs in groups:
        x = m[r, cs]
        if symmetric:
            amax = F32(np.abs(x).max())
            s = max(F32(amax / F32(mid - 1)), F32(1e-8))
            s = max(F32(np.float16(s)), F32(2.0**-24))
            c = np.clip(np.round(x / s), -(mid - 1), mid - 1) + mid
            z = F32(mid)
        else:
            lo, hi = min(F32(x.min()), F32(0)), max(F32(x.max()), F32(0))
            s = max(F32((hi - lo) / F32(qmax)), F32(1e-8))
            s = max(F32(np.float16(s)), F32(2.0**-24))
            z = F32(np.clip(np.round(-lo / s), 0, qmax))
            c = np.clip(np.round(x / s + z), 0, qmax)
        codes[r, cs], scale[r, cs], zero[r, cs] = c, s, z
    decoded = (codes - zero).astype(F32) * scale
    return codes, scale, zero, decoded.reshape(w.shape)


def per_element(enc: QuantizedTensor, t: torch.Tensor) -> torch.Tensor:
    """Broadcast an (R, G) parameter to the (R, C) matrix the codes live in."""
    rows, cols = enc.matrix_shape
    if enc.scheme.group_size == PER_TENSOR:
        return t.float().reshape(1, 1).expand(rows, cols)
    return t.float().repeat_interleave(cols // t.shape[1], dim=1)


def weights(shape, seed: int, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5 + offset


def _cols(shape) -> int:
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)




def scheme_cases():
    schemes = [(b, True) for b in (3, 4, 8)] + [(b, False) for b in (2, 3, 4, 8)]
    shapes = [(6, 32), (5, 48), (4, 2, 2, 4), (3, 4, 2, 2, 2), (48,), (4, 3, 3, 3), (13,), (1, 8), ()]
    out = []
    for shape in shapes:
        cols = _cols(shape)
        for gs in (PER_TENSOR, PER_CHANNEL, 8, 16):
            if gs > 0 and cols % gs:
                continue
            for bits, sym in schemes:
                ident = f"{shape}-int{bits}-{'sym' if sym else 'asym'}-g{gs}"
                out.append(pytest.param(shape, bits, sym, gs, id=ident))
    return out


# ---------------------------------------------------------------- QuantScheme validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, r"unsupported bit width 1: use one of \(2, 3, 4, 8\)"),
        ({"bits": 5}, "unsupported bit width 5"),
        ({"bits": 7}, "unsupported bit width 7"),
        ({"bits": 16}, "unsupported bit width 16"),
        ({"bits": 0}, "unsupported bit width 0"),
        ({"bits": "4"}, "unsupported bit width 4"),
        ({"group_size": -2}, "group_size -2 is not valid: use 'channel', 'tensor' or a positive integer"),
        ({"group_size": "row"}, "group_size 'row' is not valid"),
        ({"group_size": "Channel"}, "group_size 'Channel' is not valid"),
        ({"group_size": 32.0}, "group_size 32.0 is not valid"),
        ({"group_size": None}, "group_size None is not valid"),
        ({"bits": 2, "symmetric": True}, "2-bit symmetric quantisation has only 3 levels: use symmetric: false"),
    ],
)
def test_scheme_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantScheme(**kwargs)


def test_scheme_rejects_float_bits():
    with pytest.raises(ConfigError, match="unsupported bit width"):
        QuantScheme(bits=4.0)


@pytest.mark.parametrize(
    ("group_size", "stored", "name", "described"),
    [("channel", PER_CHANNEL, "channel", "per-channel"), ("tensor", PER_TENSOR, "tensor", "per-tensor"),
     (PER_CHANNEL, PER_CHANNEL, "channel", "per-channel"), (PER_TENSOR, PER_TENSOR, "tensor", "per-tensor"),
     (64, 64, 64, "g64")],
)
def test_scheme_granularity_names(group_size, stored, name, described):
    scheme = QuantScheme(4, False, group_size)
    assert scheme.group_size == stored
    assert scheme.to_dict() == {"bits": 4, "symmetric": False, "group_size": name}
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert scheme.describe() == f"int4 asym {described}"


@pytest.mark.parametrize(("bits", "qmax", "mid"), [(2, 3, 2), (3, 7, 4), (4, 15, 8), (8, 255, 128)])
def test_scheme_levels(bits, qmax, mid):
    scheme = QuantScheme(bits, symmetric=bits > 2)
    assert (scheme.qmin, scheme.qmax, scheme.midpoint) == (0, qmax, mid)


def test_scheme_from_dict_rejects_unknown_field():
    with pytest.raises(ConfigError, match=r"unknown quantisation field\(s\) \['bitz'\]"):
        QuantScheme.from_dict({"bitz": 4})


def test_group_size_that_does_not_divide_is_named():
    with pytest.raises(ConfigError, match="group size 24 does not divide the input width 64: choose a divisor of 64"):
        quantize(torch.zeros(4, 64), QuantScheme(4, False, 24))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises_config_error(bad):
    w = torch.ones(4, 16)
    w[2, 3] = bad
    with pytest.raises(ConfigError, match="cannot quantise a tensor holding NaN or infinity"):
        quantize(w, QuantScheme(8))


# ---------------------------------------------------------------- quantize vs reference


@pytest.mark.parametrize(("shape", "bits", "symmetric", "group_size"), scheme_cases())
@pytest.mark.parametrize("offset", [0.0, 0.8], ids=["centred", "shifted"])
def test_quantize_matches_loop_reference(shape, bits, symmetric, group_size, offset):
    w = weights(shape, seed=len(shape) * 100 + bits, offset=offset)
    enc = quantize(w, QuantScheme(bits, symmetric, group_size))
    codes, scale, zero, decoded = reference_quantize(w.numpy(), bits, symmetric, group_size)

    assert enc.shape == tuple(shape)
    assert enc.codes.dtype == torch.uint8 and enc.scale.dtype == torch.float16
    assert enc.codes.shape == (codes.shape[0], packed_row_bytes(codes.shape[1], bits))
    assert np.array_equal(enc.int_codes().numpy(), codes)
    assert np.array_equal(per_element(enc, enc.scale).numpy(), scale)
    assert np.array_equal(per_element(enc, enc.zero_points()).numpy(), zero)
    assert (enc.zero is None) == symmetric
    out = enc.decode()
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert np.array_equal(out.numpy(), decoded)  # exact: same float32 operations in the same order


@settings(max_examples=80, deadline=None)
@given(
    st.tuples(st.integers(1, 5), st.integers(1, 6)).flatmap(
        lambda rc: arrays(np.float32, (rc[0], 8 * rc[1]), elements=st.floats(-50, 50, width=32, allow_subnormal=False))
    ),
    st.sampled_from([(2, False), (3, False), (4, False), (8, False), (3, True), (4, True), (8, True)]),
    st.sampled_from([PER_TENSOR, PER_CHANNEL, 8]),
)
def test_quantize_matches_reference_on_arbitrary_values(w, scheme, group_size):
    bits, symmetric = scheme
    enc = quantize(torch.from_numpy(w), QuantScheme(bits, symmetric, group_size))
    assert np.array_equal(enc.decode().numpy(), reference_quantize(w, bits, symmetric, group_size)[3])


def in_range_errors(w: torch.Tensor, enc: QuantizedTensor):
    """(abs error, per-element scale, mask of values inside the representable range), all (R, C)."""
    m = w.reshape(enc.matrix_shape).double()
    err = (m - enc.decode().reshape(enc.matrix_shape).double()).abs()
    s = per_element(enc, enc.scale).double()
    z = per_element(enc, enc.zero_points()).double()
    if enc.scheme.symmetric:
        lim = enc.scheme.midpoint - 1
        lo, hi = -lim * s, lim * s
    else:
        lo, hi = (enc.scheme.qmin - z) * s, (enc.scheme.qmax - z) * s
    return err, s, (m >= lo) & (m <= hi), m


@settings(max_examples=80, deadline=None)
@given(
    st.tuples(st.integers(1, 4), st.integers(1, 4)).flatmap(
        lambda rc: arrays(np.float32, (rc[0], 16 * rc[1]), elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))
    ),
    st.sampled_from([(2, False), (3, False), (4, False), (8, False), (3, True), (4, True), (8, True)]),
    st.sampled_from([PER_TENSOR, PER_CHANNEL, 16]),
)
def test_error_at_most_half_a_step_inside_the_range(w, scheme, group_size):
    t = torch.from_numpy(w)
    enc = quantize(t, QuantScheme(*scheme, group_size))
    err, s, inside, m = in_range_errors(t, enc)
    # half a step, plus float32 rounding of w/s (+z) and of (c - z)*s
    bound = s * (0.5 + 1e-4) + 1e-6 * m.abs()
    assert bool((err[inside] <= bound[inside]).all())


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, False), (8, False), (3, True), (4, True), (8, True)])
@pytest.mark.parametrize("group_size", [PER_TENSOR, PER_CHANNEL, 32])
def test_minmax_error_bounded_by_one_step_everywhere(bits, symmetric, group_size):
    # Min-max ranges cover every value up to the float16 rounding of the scale and the integer zero
    # point (at most 0.5 + qmax * 2^-11 code units beyond the range), so no element is off by a step.
    w = weights((8, 128), seed=bits) * 3.0 + 0.3
    enc = quantize(w, QuantScheme(bits, symmetric, group_size))
    err, s, inside, _ = in_range_errors(w, enc)
    assert bool((err <= s).all())
    assert inside.double().mean() > 0.5  # the half-step bound below is not vacuous
    assert bool((err[inside] <= s[inside] * (0.5 + 1e-4)).all())


def test_symmetric_keeps_sign_symmetry_and_zero_exact():
    w = torch.tensor([[0.0, 1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 0.0]])
    out = quantize(w, QuantScheme(8, True)).decode()
    assert out[0, 0] == 0.0 and out[0, 7] == 0.0
    assert torch.equal(out[0, 1:7:2], -out[0, 2:7:2])
    assert out[0, 1] == pytest.approx(1.0, abs=2**-11)


def test_asymmetric_represents_zero_exactly():
    w = weights((4, 64), seed=3, offset=0.4)
    w[:, 5] = 0.0
    assert bool((quantize(w, QuantScheme(4, False, 16)).decode()[:, 5] == 0).all())


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(2, False, 8), QuantScheme(4, False, "tensor")],
                         ids=lambda s: s.describe())
def test_all_zero_tensor_decodes_to_zero(scheme):
    assert torch.equal(quantize(torch.zeros(3, 16), scheme).decode(), torch.zeros(3, 16))


def test_given_scale_and_zero_are_used():
    w = weights((2, 16), seed=4)
    scale = torch.full((2, 1, 1), 0.125)
    enc = quantize(w, QuantScheme(8, True), scale=scale)
    expected = torch.clamp(torch.round(w / 0.125), -127, 127) * 0.125
    assert torch.equal(enc.decode(), expected)
    zero = torch.full((2, 1, 1), 3.0)
    enc = quantize(w, QuantScheme(4, False), scale=scale, zero=zero)
    assert torch.equal(enc.decode(), (torch.clamp(torch.round(w / 0.125 + 3), 0, 15) - 3) * 0.125)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_is_quantised_from_its_float_value(dtype):
    w = weights((4, 32), seed=5).to(dtype)
    scheme = QuantScheme(4, False, 16)
    assert torch.equal(quantize(w, scheme).decode(), quantize(w.float(), scheme).decode())
    assert quantize(w, scheme).decode(dtype).dtype == dtype


def test_quantize_accepts_parameters_with_grad():
    p = torch.nn.Parameter(weights((4, 16), seed=6))
    assert not quantize(p, QuantScheme(8)).decode().requires_grad


# ---------------------------------------------------------------- decode_rows


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(8), QuantScheme(8, True, "tensor"), QuantScheme(4, False, 16), QuantScheme(3, False, 8),
     QuantScheme(2, False, "channel"), QuantScheme(3, True, "tensor")],
    ids=lambda s: s.describe(),
)
@pytest.mark.parametrize("index", [[0], [9, 0, 9, 3], list(range(10))], ids=["one", "repeats", "all"])
def test_decode_rows_equals_decode_then_index(scheme, index):
    enc = quantize(weights((10, 32), seed=7, offset=0.2), scheme)
    idx = torch.tensor(index)
    assert torch.equal(enc.decode_rows(idx), enc.decode()[idx])
    assert torch.equal(enc.decode_rows(idx, torch.float16), enc.decode(torch.float16)[idx])


def test_decode_rows_of_no_rows_is_empty():
    enc = quantize(weights((10, 32), seed=7), QuantScheme(4, False, 16))
    assert enc.decode_rows(torch.zeros(0, dtype=torch.long)).shape == (0, 32)


# ---------------------------------------------------------------- parts round trip


ROUND_TRIP_SCHEMES = [QuantScheme(8), QuantScheme(8, False, "tensor"), QuantScheme(4, False, 16),
                      QuantScheme(4, True, 32), QuantScheme(3, False, "channel"), QuantScheme(2, False, 8)]


@pytest.mark.parametrize("scheme", ROUND_TRIP_SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", [(6, 32), (4, 2, 2, 8), (64,)])
def test_from_parts_round_trips_exactly(scheme, shape):
    enc = quantize(weights(shape, seed=8, offset=0.1), scheme)
    meta = json.loads(json.dumps(enc.meta()))  # what a file would hold
    assert meta["kind"] == "quantized" and meta["shape"] == list(shape)
    back = encoding_from_parts(meta, {k: v.clone() for k, v in enc.arrays().items()})
    assert isinstance(back, QuantizedTensor)
    assert back.scheme == scheme and back.shape == tuple(shape)
    assert back.arrays().keys() == enc.arrays().keys()
    assert all(torch.equal(back.arrays()[k], v) for k, v in enc.arrays().items())
    assert torch.equal(back.decode(), enc.decode())


@pytest.mark.parametrize(
    ("shape", "scheme", "expected_bits"),
    [
        # 16 rows x 64: codes 16*32 B, scale 16*2*2 B, zero 16*2*2 B = 640 B over 1024 weights
        ((16, 64), QuantScheme(4, False, 32), 640 * 8 / 1024),
        # codes 16*64 B + scale 16*2 B = 1056 B
        ((16, 64), QuantScheme(8, True, "channel"), 1056 * 8 / 1024),
        # codes 4*24 B + one fp16 scale = 98 B over 256 weights
        ((4, 64), QuantScheme(3, True, "tensor"), 98 * 8 / 256),
        # codes 8*ceil(40/8)*2 = 80 B, scale 16 B, zero 16 B over 320 weights
        ((8, 40), QuantScheme(2, False, "channel"), 112 * 8 / 320),
    ],
)
def test_bits_per_weight_by_hand(shape, scheme, expected_bits):
    enc = quantize(weights(shape, seed=9), scheme)
    assert enc.nbytes == expected_bits * math.prod(shape) / 8
    assert enc.bits_per_weight == pytest.approx(expected_bits, rel=1e-12)


def _asym():
    enc = quantize(weights((6, 32), seed=10, offset=0.3), QuantScheme(4, False, 16))
    return enc.meta(), dict(enc.arrays())


def _sym():
    enc = quantize(weights((6, 32), seed=10), QuantScheme(8, True, "channel"))
    return enc.meta(), dict(enc.arrays())


def _edit(base, meta_changes=None, array_changes=None, drop=()):
    meta, arrays_ = base()
    meta.update(meta_changes or {})
    for key in drop:
        meta.pop(key, None)
        arrays_.pop(key, None)
    for name, fn in (array_changes or {}).items():
        arrays_[name] = fn(arrays_.get(name))
    return meta, arrays_


HOSTILE = [
    ("codes-short-row", _edit(_asym, array_changes={"codes": lambda c: c[:, :-1]}),
     r"quantized array 'codes' is \(6, 15\) torch.uint8, expected \(6, 16\) torch.uint8"),
    ("codes-missing-row", _edit(_asym, array_changes={"codes": lambda c: c[:-1]}), r"'codes' is \(5, 16\)"),
    ("codes-int16", _edit(_asym, array_changes={"codes": lambda c: c.to(torch.int16)}), r"'codes' is .*torch.int16"),
    ("codes-float", _edit(_sym, array_changes={"codes": lambda c: c.float()}), r"'codes' is .*torch.float32"),
    ("codes-1d", _edit(_sym, array_changes={"codes": lambda c: c.reshape(-1)}), r"'codes' is \(192,\)"),
    ("codes-missing", _edit(_asym, drop=("codes",)), "quantized encoding is missing its 'codes' array"),
    ("scale-missing", _edit(_asym, drop=("scale",)), "quantized encoding is missing its 'scale' array"),
    ("scale-float32", _edit(_asym, array_changes={"scale": lambda s: s.float()}), r"'scale' is \(6, 2\) torch.float32"),
    ("scale-shape", _edit(_asym, array_changes={"scale": lambda s: s[:, :1]}), r"'scale' is \(6, 1\)"),
    ("scale-flat", _edit(_sym, array_changes={"scale": lambda s: s.reshape(-1)}), r"'scale' is \(6,\)"),
    ("zero-missing", _edit(_asym, drop=("zero",)), "quantized array 'zero' is missing"),
    ("zero-float32", _edit(_asym, array_changes={"zero": lambda z: z.float()}), r"'zero' is .*torch.float32"),
    ("zero-on-symmetric", _edit(_sym, array_changes={"zero": lambda _: torch.zeros(6, 1, dtype=torch.float16)}),
     "symmetric quantized encoding carries a zero array"),
    ("shape-string", _edit(_asym, {"shape": "6x32"}), "quantized encoding has an invalid shape '6x32'"),
    ("shape-negative", _edit(_asym, {"shape": [6, -32]}), r"invalid shape \[6, -32\]"),
    ("shape-float", _edit(_asym, {"shape": [6.0, 32]}), "invalid shape"),
    ("shape-none", _edit(_asym, {"shape": None}), "invalid shape None"),
    ("shape-absent", _edit(_asym, drop=("shape",)), "invalid shape None"),
    ("shape-too-many-dims", _edit(_asym, {"shape": [1] * 9}), "invalid shape"),
    ("shape-huge", _edit(_asym, {"shape": [2**40, 32]}), "invalid shape"),
    ("shape-disagrees", _edit(_asym, {"shape": [12, 32]}), r"'codes' is \(6, 16\) torch.uint8, expected \(12, 16\)"),
    ("bits-5", _edit(_asym, {"bits": 5}), r"invalid parameters \(unsupported bit width 5"),
    ("bits-string", _edit(_asym, {"bits": "4"}), "invalid parameters"),
    ("bits-wrong", _edit(_asym, {"bits": 8}), r"'codes' is \(6, 16\) torch.uint8, expected \(6, 32\)"),
    ("granularity-name", _edit(_asym, {"group_size": "row"}), "invalid parameters"),
    ("group-not-dividing", _edit(_asym, {"group_size": 24}), r"inconsistent \(group size 24 does not divide"),
    ("symmetric-2bit", _edit(_asym, {"bits": 2, "symmetric": True}), "invalid parameters"),
    ("asym-read-as-sym", _edit(_asym, {"symmetric": True}), "symmetric quantized encoding carries a zero array"),
    ("unknown-meta-type", _edit(_asym, {"group_size": [16]}), "invalid parameters"),
]


@pytest.mark.parametrize(("parts", "message"), [pytest.param(p, m, id=i) for i, p, m in HOSTILE])
def test_hostile_parts_raise_format_error(parts, message):
    meta, arrays_ = parts
    with pytest.raises(FormatError, match=message):
        encoding_from_parts(meta, arrays_)
    with pytest.raises(FormatError, match=message):
        QuantizedTensor.from_parts(meta, arrays_)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"kind": "quantized_v9", "shape": [2, 2]}, r"unknown encoding kind 'quantized_v9' \(known: .*'quantized'"),
        ({"shape": [2, 2]}, "encoding metadata has no 'kind' string"),
        ({"kind": 5}, "no 'kind' string"),
        ([("kind", "quantized")], "no 'kind' string"),
        (None, "no 'kind' string"),
    ],
)
def test_unknown_or_missing_kind(meta, message):
    with pytest.raises(FormatError, match=message):
        encoding_from_parts(meta, {})


@pytest.mark.parametrize("changes", [{"bits": 8.0}, {"symmetric": "no"}], ids=["bits-float", "symmetric-string"])
def test_hostile_parameter_types_raise_format_error(changes):
    meta, arrays_ = _edit(_sym, changes)
    with pytest.raises(FormatError):
        encoding_from_parts(meta, arrays_).decode()
