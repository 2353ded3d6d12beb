"""Bit packing: exact round trips, and golden bytes that pin the layout documented in packing.py.

Every golden value below is worked out by hand from the module docstring (code j of a row sits
at bits [j*b, (j+1)*b) of a little-endian bit stream; rows padded with zero codes to a multiple
of 8 codes), never by calling pack_codes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modelpress.encodings import SUPPORTED_BITS, pack_codes, packed_row_bytes, unpack_codes
from modelpress.errors import ConfigError, ModelpressError


def row(*values: int, dtype=torch.uint8) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=dtype)


def reference_pack(codes: list[list[int]], bits: int) -> list[list[int]]:
    """The docstring's rule, bit by bit in plain Python."""
    out = []
    for r in codes:
        n = len(r) + (-len(r)) % 8
        stream = [0] * (n * bits)
        for j, c in enumerate(r):
            for t in range(bits):
                stream[j * bits + t] = (c >> t) & 1
        out.append([sum(stream[8 * i + k] << k for k in range(8)) for i in range(len(stream) // 8)])
    return out


# ---------------------------------------------------------------- golden bytes (by hand)

GOLDEN = [
    # b=4: byte i = code 2i (low nibble) | code 2i+1 << 4
    pytest.param(4, [1, 2, 3, 4, 5, 6, 7, 8], [0x21, 0x43, 0x65, 0x87], id="4bit-1..8"),
    pytest.param(4, [15, 0, 0, 15, 10, 5, 0, 0], [0x0F, 0xF0, 0x5A, 0x00], id="4bit-nibbles"),
    # 9 codes pad to 16: the 9th code sits in the low nibble of byte 4, then 3 zero bytes
    pytest.param(4, [1, 2, 3, 4, 5, 6, 7, 8, 9], [0x21, 0x43, 0x65, 0x87, 0x09, 0, 0, 0], id="4bit-pad"),
    # b=3: codes 0..7 as one 24-bit little-endian word sum(j << 3j) = 0xFAC688
    pytest.param(3, [0, 1, 2, 3, 4, 5, 6, 7], [0x88, 0xC6, 0xFA], id="3bit-0..7"),
    pytest.param(3, [7, 0, 0, 0, 0, 0, 0, 0], [0x07, 0x00, 0x00], id="3bit-first"),
    # code 2 = 7 occupies stream bits 6..8: top two bits of byte 0 and bit 0 of byte 1
    pytest.param(3, [0, 0, 7, 0, 0, 0, 0, 0], [0xC0, 0x01, 0x00], id="3bit-straddles-byte"),
    # code 5 = 0b101 occupies stream bits 15..17: bit 7 of byte 1 and bit 1 of byte 2
    pytest.param(3, [0, 0, 0, 0, 0, 5, 0, 0], [0x00, 0x80, 0x02], id="3bit-code5-straddles"),
    pytest.param(3, [0, 0, 0, 0, 0, 0, 0, 7], [0x00, 0x00, 0xE0], id="3bit-last"),
    pytest.param(3, [1], [0x01, 0x00, 0x00], id="3bit-pad-single"),
    # b=2: byte i = codes 4i..4i+3, lowest bits first
    pytest.param(2, [0, 1, 2, 3, 3, 2, 1, 0], [0xE4, 0x1B], id="2bit-ramp"),
    pytest.param(2, [1, 1, 1, 1, 1], [0x55, 0x01], id="2bit-pad"),
    pytest.param(2, [3, 0, 0, 0, 0, 0, 0, 3], [0x03, 0xC0], id="2bit-ends"),
    # b=8: one code per byte, unchanged
    pytest.param(8, [0, 17, 255, 128, 1, 2, 3, 4], [0, 17, 255, 128, 1, 2, 3, 4], id="8bit"),
]


@pytest.mark.parametrize(("bits", "codes", "expected"), GOLDEN)
def test_golden_bytes(bits, codes, expected):
    packed = pack_codes(row(*codes), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [expected]
    assert reference_pack([codes], bits) == [expected]  # the hand values obey the written rule
    assert unpack_codes(packed, bits, len(codes)).tolist() == [codes]


def test_rows_are_packed_independently():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [15, 14, 13, 12, 11, 10, 9, 8, 7]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [
        [0x21, 0x43, 0x65, 0x87, 0x09, 0, 0, 0],
        [0xEF, 0xCD, 0xAB, 0x89, 0x07, 0, 0, 0],
    ]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.float32])
def test_accepts_any_integer_valued_dtype(dtype):
    assert pack_codes(row(1, 2, 3, 4, 5, 6, 7, 8, dtype=dtype), 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("n", "bits", "expected"),
    [(0, 4, 0), (1, 2, 2), (1, 3, 3), (1, 4, 4), (8, 2, 2), (8, 3, 3), (8, 4, 4), (9, 3, 6), (16, 3, 6),
     (17, 4, 12), (384, 4, 192), (385, 2, 98), (8, 8, 8), (64, 8, 64)],
)
def test_packed_row_bytes(n, bits, expected):
    assert packed_row_bytes(n, bits) == expected


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 8, 13, 31, 64])
def test_packed_width_matches_packed_row_bytes(bits, n):
    assert pack_codes(torch.zeros(3, n, dtype=torch.uint8), bits).shape == (3, packed_row_bytes(n, bits))


@pytest.mark.parametrize("n", [1, 5, 13])
def test_8bit_width_matches_packed_row_bytes_for_ragged_rows(n):
    codes = torch.arange(n, dtype=torch.uint8).reshape(1, n)
    packed = pack_codes(codes, 8)
    assert packed.shape == (1, packed_row_bytes(n, 8))
    assert torch.equal(unpack_codes(packed, 8, n), codes)


# ---------------------------------------------------------------- round trips (hypothesis)


@st.composite
def code_matrices(draw, bits_choices=(2, 3, 4), multiple_of_8: bool = False):
    bits = draw(st.sampled_from(bits_choices))
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 6).map(lambda k: 8 * k) if multiple_of_8 else st.integers(1, 41))
    codes = draw(arrays(np.uint8, (rows, cols), elements=st.integers(0, (1 << bits) - 1)))
    return bits, torch.from_numpy(codes)


@settings(max_examples=150, deadline=None)
@given(code_matrices())
def test_round_trip_is_exact(case):
    bits, codes = case
    packed = pack_codes(codes, bits)
    assert packed.shape == (codes.shape[0], packed_row_bytes(codes.shape[1], bits))
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    out = unpack_codes(packed, bits, codes.shape[1])
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@settings(max_examples=40, deadline=None)
@given(code_matrices(bits_choices=(8,), multiple_of_8=True))
def test_round_trip_8bit_is_exact(case):
    bits, codes = case
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, codes)  # unchanged
    assert torch.equal(unpack_codes(packed, bits, codes.shape[1]), codes)


@settings(max_examples=60, deadline=None)
@given(code_matrices(bits_choices=(2, 3, 4)), st.data())
def test_row_slice_of_packed_is_packing_of_row_slice(case, data):
    bits, codes = case
    rows = codes.shape[0]
    idx = torch.tensor(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=8)))
    start = data.draw(st.integers(0, rows - 1))
    stop = data.draw(st.integers(start + 1, rows))
    packed = pack_codes(codes, bits)
    assert torch.equal(packed[idx], pack_codes(codes[idx], bits))
    assert torch.equal(packed[start:stop], pack_codes(codes[start:stop], bits))
    assert torch.equal(unpack_codes(packed[idx], bits, codes.shape[1]), codes[idx])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_codes_survive_at_every_position(bits):
    # Every code value at every position of an 8-code group (covers each byte straddle once).
    levels = 1 << bits
    codes = torch.tensor([[(v + j) % levels for j in range(8)] for v in range(levels)], dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 8), codes)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 9, 16, -4])
def test_unsupported_bits_raise_config_error(bits):
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=rf"unsupported bit width {bits}: use one of \(2, 3, 4, 8\)"):
        pack_codes(codes, bits)
    with pytest.raises(ConfigError, match="unsupported bit width"):
        unpack_codes(codes, bits, 8)
    with pytest.raises(ConfigError, match="unsupported bit width"):
        packed_row_bytes(8, bits)


def test_config_error_is_a_modelpress_value_error():
    with pytest.raises(ModelpressError):
        packed_row_bytes(8, 5)
    with pytest.raises(ValueError):
        packed_row_bytes(8, 5)


@pytest.mark.parametrize("shape", [(8,), (2, 2, 8), ()])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_rejects_non_matrix(shape, bits):
    with pytest.raises(ValueError, match=r"pack_codes takes a 2-D \(rows, codes\) tensor"):
        pack_codes(torch.zeros(shape, dtype=torch.uint8), bits)


@pytest.mark.parametrize(
    ("bits", "width", "n_codes"),
    [(4, 3, 8), (4, 5, 8), (3, 4, 8), (3, 3, 9), (2, 3, 8), (8, 7, 8), (8, 9, 8), (2, 2, 0)],
)
def test_unpack_rejects_wrong_width(bits, width, n_codes):
    with pytest.raises(ValueError, match=rf"do not hold {n_codes} {bits}-bit codes per row"):
        unpack_codes(torch.zeros(2, width, dtype=torch.uint8), bits, n_codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_rejects_three_dims(bits):
    with pytest.raises(ValueError, match="codes per row"):
        unpack_codes(torch.zeros(2, bits, 1, dtype=torch.uint8), bits, 8)


def test_unpack_rejects_scalar_with_value_error():
    with pytest.raises(ValueError, match="codes per row"):
        unpack_codes(torch.tensor(3, dtype=torch.uint8), 4, 1)
