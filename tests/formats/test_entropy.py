"""Entropy coding of checkpoint integer arrays: exact round trips, real savings, hostile entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modelpress.compress import compress
from modelpress.errors import FormatError
from modelpress.formats.checkpoint import MANIFEST, WEIGHTS, load, save
from modelpress.formats.entropy import (
    ENTROPY_KEY,
    SYMBOL_BITS,
    coder_available,
    entropy_code,
    entropy_decode,
    from_symbols,
    symbol_count,
    to_symbols,
)

pytestmark = pytest.mark.skipif(not coder_available(), reason="needs the native rANS coder (modelpress._fcodec)")


def reference_symbols(raw: np.ndarray, bits: int) -> np.ndarray:
    """Plain bit-by-bit reading of the LSB-first stream, as the docstring defines it."""
    stream = [(int(byte) >> i) & 1 for byte in raw for i in range(8)]
    stream += [0] * (-len(stream) % bits)
    return np.array([sum(stream[k + i] << i for i in range(bits)) for k in range(0, len(stream), bits)], np.uint8)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(SYMBOL_BITS))
def test_symbols_match_the_reference_and_invert(data: bytes, bits: int) -> None:
    raw = np.frombuffer(data, np.uint8)
    symbols = to_symbols(raw, bits)
    assert len(symbols) == symbol_count(len(raw), bits)
    np.testing.assert_array_equal(symbols, reference_symbols(raw, bits) if bits < 8 else raw)
    assert from_symbols(symbols, bits, len(raw)).tobytes() == data


def skewed_codes(n: int, bits: int, seed: int = 0) -> np.ndarray:
    """Codes of a bell-shaped weight: the middle values are the common ones."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.normal((2**bits - 1) / 2, max(2.0 ** (bits - 3), 0.5), n)), 0, 2**bits - 1).astype(np.uint8)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 5000), st.sampled_from([2, 3, 4, 5, 8]), st.integers(0, 2**16))
def test_entropy_code_round_trips_exactly(n: int, bits: int, seed: int) -> None:
    codes = torch.from_numpy(skewed_codes(n, bits, seed))
    tensors = {"fc.weight::codes": codes, "fc.bias": torch.randn(3)}
    coded, entries = entropy_code(tensors, {"fc.weight::codes"})
    assert set(entries) <= {"fc.weight::codes"}
    back = entropy_decode(coded, entries, where=Path("x"))
    assert torch.equal(back["fc.weight::codes"], codes)
    assert torch.equal(back["fc.bias"], tensors["fc.bias"])


def test_skewed_codes_are_coded_smaller_and_uniform_ones_left_alone() -> None:
    skewed = torch.from_numpy(skewed_codes(100_000, 8))
    uniform = torch.from_numpy(np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8))
    coded, entries = entropy_code({"a::codes": skewed, "b::codes": uniform}, {"a::codes", "b::codes"})
    assert set(entries) == {"a::codes"}
    assert coded["a::codes"].numel() < 0.9 * skewed.numel()
    assert coded["b::codes"] is uniform


def test_three_bit_codes_are_coded_as_three_bit_symbols() -> None:
    from modelpress.encodings.packing import pack_codes

    codes = torch.from_numpy(skewed_codes(64 * 384, 3)).reshape(64, 384)
    packed = pack_codes(codes, 3)
    _, entries = entropy_code({"m::codes": packed}, {"m::codes"})
    assert entries["m::codes"]["symbol_bits"] == 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.weight, std=0.05)  # bell-shaped, like trained weights: skewed int8 codes
    return model


def test_saved_model_is_smaller_and_loads_identically(tmp_path) -> None:
    model = compress(_model(), {"stages": [{"pass": "rtn", "targets": {"types": ["Linear"]},
                                            "config": {"bits": 4, "group_size": "channel"}}]})
    plain = save(model, tmp_path / "plain", entropy=False)
    coded = save(model, tmp_path / "coded")
    assert (coded / WEIGHTS).stat().st_size < (plain / WEIGHTS).stat().st_size
    manifest = json.loads((coded / MANIFEST).read_text())
    assert manifest[ENTROPY_KEY] and ENTROPY_KEY not in json.loads((plain / MANIFEST).read_text())
    x = torch.randn(5, 64)
    for folder in (plain, coded):
        assert torch.equal(load(folder, model=_model())(x), model(x))


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(codec="zstd"), "unknown codec"),
    (lambda e: e.update(dtype="float32"), "dtype"),
    (lambda e: e.update(shape=[-1]), "invalid shape"),
    (lambda e: e.update(shape=[2**40, 2**40]), "invalid shape"),
    (lambda e: e.update(symbol_bits=4), "symbol_bits"),
    (lambda e: e.update(symbol_bits=True), "symbol_bits"),
    (lambda e: e.pop("dtype"), "invalid entry"),
    (lambda e: e.update(shape=[10]), "holds 10000 symbols .* needs 10"),  # the payload's header disagrees
    (lambda e: e.update(shape=[2**17, 2**17]), "needs 17179869184"),  # refused before allocating 16 GiB
    (lambda e: e.update(dtype=["uint8"]), "dtype"),
    (lambda e: e.update(codec=["fans"]), "unknown codec"),
    (lambda e: e.update(shape=[0]), "needs 0"),
])
def test_hostile_entries_raise_format_error(change, message) -> None:
    codes = torch.from_numpy(skewed_codes(10_000, 8))
    coded, entries = entropy_code({"w::codes": codes}, {"w::codes"})
    change(entries["w::codes"])
    with pytest.raises(FormatError, match=message):
        entropy_decode(coded, entries, where=Path("ckpt"))


def test_missing_or_float_coded_array_raises() -> None:
    codes = torch.from_numpy(skewed_codes(10_000, 8))
    coded, entries = entropy_code({"w::codes": codes}, {"w::codes"})
    with pytest.raises(FormatError, match="missing or not a flat uint8"):
        entropy_decode({}, entries, where=Path("ckpt"))
    with pytest.raises(FormatError, match="missing or not a flat uint8"):
        entropy_decode({"w::codes": torch.zeros(4)}, entries, where=Path("ckpt"))
    with pytest.raises(FormatError, match="mapping"):
        entropy_decode(coded, [1, 2], where=Path("ckpt"))


@pytest.mark.parametrize("cut", [0, 3, 6, 100])
def test_truncated_payload_raises(cut) -> None:
    codes = torch.from_numpy(skewed_codes(10_000, 8))
    coded, entries = entropy_code({"w::codes": codes}, {"w::codes"})
    coded["w::codes"] = coded["w::codes"][:cut].clone()
    with pytest.raises(FormatError):
        entropy_decode(coded, entries, where=Path("ckpt"))


def test_symbols_wider_than_declared_are_rejected() -> None:
    wide = torch.from_numpy(skewed_codes(10_000, 8))  # byte symbols reach 255
    coded, entries = entropy_code({"w::codes": wide}, {"w::codes"})
    entry = entries["w::codes"]
    entry.update(symbol_bits=5, shape=[10_000 * 5 // 8])  # exactly 10_000 five-bit symbols
    with pytest.raises(FormatError, match="wider than 5 bits"):
        entropy_decode(coded, entries, where=Path("ckpt"))
