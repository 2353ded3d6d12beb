"""The `grid` codec: float32, float16 or bfloat16 on a 4-bit affine or 8-bit symmetric grid per 32 values, stored as
scales and codes.

Every input round-trips bit for bit (NaNs, infinities, values on no grid); grid data (made as GGUF's Q4_1 and
Q8_0 dequantise: float16 scales, float32 arithmetic) is fitted and compresses, kept as float32 or rounded to
16 bits; decoding matches a plain per-element reference; hostile payloads raise FormatError."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpress.codecs import Fans, Grid, NATIVE_AVAILABLE, choose, codec_from
from modelpress.codecs.grid import GROUP, fit
from modelpress.errors import FormatError
from modelpress.store import planes

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
VARIANTS = [Grid(2, 4, "up"), Grid(2, 4, "even"), Grid(2, 8, "up"), Grid(2, 8, "even"), Grid(2, 4, "half"),
            Grid(2, 8, "half"), Grid(4, 4, "none"), Grid(4, 8, "none")]
UINT = {2: np.uint16, 4: np.uint32}


def round_trip(codec: Grid, raw: bytes) -> tuple[bytes, bytes]:
    payload = codec.encode(memoryview(raw))
    out = bytearray(len(raw))
    codec.decode_into(memoryview(payload), memoryview(out))
    return payload, bytes(out)


def q4_1(groups: int, seed: int) -> torch.Tensor:
    """float32 as a Q4_1 block dequantises: float16 d and m per 32 values, w = d * q + m."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(groups, 1, generator=g) * 0.02 + 1e-4).to(torch.float16).float()
    m = (-torch.rand(groups, 1, generator=g) * 0.15).to(torch.float16).float()
    q = torch.randint(0, 16, (groups, GROUP), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15  # the block's own minimum and maximum
    return (d * q + m).reshape(-1)


def q8_0(groups: int, seed: int) -> torch.Tensor:
    """float32 as a Q8_0 block dequantises: float16 d per 32 values, w = d * q, |q| <= 127, one |q| = 127."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(groups, 1, generator=g) * 1e-3 + 1e-5).to(torch.float16).float()
    q = (torch.randn(groups, GROUP, generator=g) * 30).round().clamp(-127, 127) + 0.0  # bell-shaped; no -0.0
    q[:, 3] = 127 * torch.where(torch.rand(groups, generator=g) < 0.5, -1.0, 1.0)
    return (d * q).reshape(-1)


def bf16_bits(x: torch.Tensor, rounding: str) -> bytes:
    """The stored bytes of float32 `x`: as they are ("none"), as float16 ("half"), or rounded to bfloat16 as
    `rounding` says."""
    if rounding == "none":
        return x.contiguous().numpy().tobytes()
    if rounding == "half":
        return x.half().contiguous().view(torch.int16).numpy().tobytes()
    hi = planes.split(x)[0] if rounding == "up" else x.to(torch.bfloat16)
    return hi.contiguous().view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
@FUZZ
@given(data=st.data())
def test_any_bits_round_trip_exactly(codec, data):
    n = data.draw(st.integers(0, 200))
    raw = data.draw(st.binary(min_size=codec.width * n, max_size=codec.width * n))
    assert round_trip(codec, raw)[1] == raw


@pytest.mark.parametrize("width, rounding", [(2, "up"), (2, "even"), (2, "half"), (4, "none")])
@pytest.mark.parametrize("make, bits", [(q4_1, 4), (q8_0, 8)])
@FUZZ
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 40), extra=st.integers(0, 31))
def test_grid_data_is_fitted_and_round_trips(width, rounding, make, bits, seed, groups, extra):
    raw = bf16_bits(torch.cat([make(groups, seed), torch.randn(extra)]), rounding)
    codec = Grid(width, bits, rounding)
    h = np.frombuffer(raw, UINT[width])[: groups * GROUP].reshape(groups, GROUP)
    fitted = fit(h, bits, rounding)[0].sum()
    if width == 4:
        assert fitted == groups  # float32 as the blocks dequantise: every group, exactly
    else:
        assert fitted >= groups - 2  # ~1 group in 1000 finds no grid (kept as it is)
    payload, back = round_trip(codec, raw)
    assert back == raw


@pytest.mark.parametrize("width, rounding", [(2, "up"), (2, "half"), (4, "none")])
@pytest.mark.parametrize("make, bits", [(q4_1, 4), (q8_0, 8)])
def test_grid_data_compresses_beyond_generic_float_coding(width, rounding, make, bits):
    raw = bf16_bits(make(4096, 0), rounding)
    codec = Grid.for_data(memoryview(raw), width)
    assert codec == Grid(width, bits, rounding)
    share = fit(np.frombuffer(raw, UINT[width]).reshape(-1, GROUP), bits, rounding)[0].mean()
    assert share >= (0.99 if width == 2 else 1.0)  # measured 0.999 for bfloat16
    payload, back = round_trip(codec, raw)
    assert back == raw
    # codes of 4 / ~7 bits and a scale or two, for 16 or 32 bits a value
    assert len(raw) / len(payload) >= {(2, 4): 3.0, (2, 8): 1.8, (4, 4): 6.0, (4, 8): 3.6}[width, bits]
    if NATIVE_AVAILABLE:
        assert len(payload) < 0.75 * len(Fans(width).encode(memoryview(raw)))
    assert choose(memoryview(raw), width, True) == codec


def test_floats_on_no_grid_are_not_offered_grid():
    g = torch.Generator().manual_seed(1)
    bf16 = memoryview(torch.randn(8192, generator=g).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    f32 = memoryview(torch.randn(8192, generator=g).numpy().tobytes())
    assert Grid.probe(bf16, 2) is None and Grid.probe(f32, 4) is None
    assert not isinstance(choose(bf16, 2, True), Grid) and not isinstance(choose(f32, 4, True), Grid)
    assert Grid.probe(bf16, 1) is None and Grid.probe(bf16, 8) is None


def reference_decode(codec: Grid, raw: bytes, payload: bytes) -> list[int]:
    """Element by element, in plain Python floats: d * q + m in float32 (a multiply, then an add, each rounded),
    rounded to bfloat16 bits as the codec says; other elements as stored."""
    def f32(x: float) -> float:
        return struct.unpack("<f", struct.pack("<f", x))[0]

    def to_bf16(x: float) -> int:
        bits = struct.unpack("<I", struct.pack("<f", x))[0]
        if codec.rounding == "none":
            return bits
        if codec.rounding == "half":  # Python's own IEEE half conversion (nearest even), from the exact float
            return struct.unpack("<H", struct.pack("<e", x))[0]
        if codec.rounding == "up":
            return ((bits + 0x8000) >> 16) & 0xFFFF
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF

    h = np.frombuffer(raw, UINT[codec.width])
    groups = len(h) // GROUP
    ok, d, m, q = fit(h[: groups * GROUP].reshape(groups, GROUP), codec.bits, codec.rounding)
    out = [int(v) for v in h]
    for g in range(groups):
        if ok[g]:
            for i in range(GROUP):
                out[g * GROUP + i] = to_bf16(f32(f32(float(d[g]) * int(q[g, i])) + float(m[g])))
    return out


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
def test_decoding_matches_the_plain_reference(codec):
    make = q4_1 if codec.bits == 4 else q8_0
    raw = bf16_bits(torch.cat([make(6, 3), torch.randn(40)]), codec.rounding)
    payload, back = round_trip(codec, raw)
    assert list(np.frombuffer(back, UINT[codec.width])) == reference_decode(codec, raw, payload)
    assert back == raw


def test_parameters_are_checked():
    for params in ({"width": 4, "bits": 4, "rounding": "up"}, {"width": 2, "bits": 3, "rounding": "up"},
                   {"width": 2, "bits": 4, "rounding": "down"}, {"width": 2, "bits": 4},
                   {"width": 2, "bits": 4, "rounding": "none"}, {"width": 8, "bits": 8, "rounding": "none"},
                   {"width": 4, "bits": 8}, {"width": 4, "bits": 8, "rounding": "half"},
                   # other types, as a hostile chunk head could give them: refused, never a TypeError later
                   {"width": [4], "bits": 4, "rounding": "none"}, {"width": {}, "bits": 4, "rounding": "up"},
                   {"width": 4.0, "bits": 4, "rounding": "none"}, {"width": 2.0, "bits": 4, "rounding": "up"},
                   {"width": 4, "bits": 4.0, "rounding": "none"}, {"width": 2, "bits": 8, "rounding": ["up"]},
                   {"width": True, "bits": 4, "rounding": "up"}):
        with pytest.raises(FormatError):
            codec_from("grid", params)
    for codec in (Grid(2, 8, "even"), Grid(2, 4, "half"), Grid(4, 4, "none")):
        assert codec_from("grid", codec.params()) == codec


def _payload() -> tuple[bytes, int]:
    raw = bf16_bits(q4_1(8, 0), "up") + bytes(6)
    return Grid().encode(memoryview(raw)), len(raw)


@pytest.mark.parametrize("mutate", [
    lambda p: p[:-1],  # truncated
    lambda p: p + b"\0",  # trailing bytes
    lambda p: b"\x07" + p[1:],  # an unknown section mode
    lambda p: p[:1] + struct.pack("<Q", 1 << 40) + p[9:],  # a section longer than the payload
    lambda p: b"",
], ids=["truncated", "trailing", "mode", "length", "empty"])
def test_hostile_payloads_raise_format_errors(mutate):
    payload, size = _payload()
    with pytest.raises(FormatError):
        Grid().decode_into(memoryview(mutate(payload)), memoryview(bytearray(size)))
    wide = Grid(4, 4, "none")
    raw = bf16_bits(q4_1(8, 0), "none") + bytes(12)
    with pytest.raises(FormatError):
        wide.decode_into(memoryview(mutate(wide.encode(memoryview(raw)))), memoryview(bytearray(len(raw))))
    with pytest.raises(FormatError):  # the output size says the payload's sections are for other widths
        wide.decode_into(memoryview(wide.encode(memoryview(raw))), memoryview(bytearray(len(raw) + 2)))


@FUZZ
@given(data=st.data())
def test_random_payloads_decode_or_raise_format_errors(data):
    payload, size = _payload()
    if data.draw(st.booleans()):
        payload = data.draw(st.binary(max_size=600))
    else:
        payload = bytearray(payload)
        for _ in range(data.draw(st.integers(1, 4))):
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    try:
        Grid().decode_into(memoryview(bytes(payload)), memoryview(bytearray(size)))
    except FormatError:
        pass


def test_a_planar_store_of_grid_weights_reads_little_more_than_half_at_bf16(tmp_path):
    """SmolLM2's shape in small: float32 Linear weights on Q4_1 grids and an embedding on Q8_0's, stored by
    planes; the high planes (a bf16 load) are coded as grids."""
    from modelpress.store import Store
    weights = {"linear.weight": q4_1(2048, 4).reshape(64, 1024), "embed.weight": q8_0(512, 5).reshape(64, 256)}
    with Store.init(tmp_path / "s") as store:
        store.put(weights, "m", planes=["*"])
        version = store.version("m")
        rows = store.catalog.chunks([c for t in version.tensors for c in t.chunks])
        sizes = {t.name: sum(rows[c].stored_size for c in t.chunks) for t in version.tensors}
        codecs = {t.name: {rows[c].codec.name for c in t.chunks} for t in version.tensors}
        assert all(codecs[planes.plane_names(n)[0]] == {"grid"} for n in weights)
        high = sum(s for n, s in sizes.items() if not n.endswith(planes.LO))
        assert high <= 0.55 * sum(sizes.values())
        got = store.get("m", precision="bf16")
        for name, w in weights.items():
            assert torch.equal(got[name], planes.split(w)[0].float())
        exact = store.get("m")
        assert all(torch.equal(exact[n], w) for n, w in weights.items())


@pytest.mark.parametrize("codec", VARIANTS, ids=repr)
@pytest.mark.parametrize("odd", [0x7FC1, 0xFFC0, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x8001, 0x7BFF, 0xFBFF])
def test_constant_special_groups_beside_fitted_ones_round_trip(codec, odd):
    """A group of one NaN payload, infinity, -0.0 or a subnormal, next to groups that do fit: the special group is
    either rebuilt from finite scales or kept as it is, never rebuilt through a NaN scale; also float16's largest
    finite values (0x7BFF, 0xFBFF: no step up). (As float32: the same bfloat16 pattern in the high half, and a
    low half that keeps a NaN a NaN and a subnormal a subnormal.)"""
    make = q4_1 if codec.bits == 4 else q8_0
    uint = UINT[codec.width]
    special = odd if codec.width == 2 else (odd << 16) | (0x0001 if odd in (0x7FC1, 0xFFC0) else 0)
    grid = np.frombuffer(bf16_bits(make(3, 7), codec.rounding), uint)
    raw = np.concatenate([np.full(GROUP, special, uint), grid, np.zeros(GROUP, uint)]).tobytes()
    payload, back = round_trip(codec, raw)
    assert back == raw
    h = np.frombuffer(raw, uint).reshape(-1, GROUP)
    ok, d, m, _ = fit(h, codec.bits, codec.rounding)
    assert np.isfinite(d[ok]).all() and np.isfinite(m[ok]).all() and ok[1:4].sum() >= 2


def test_a_payload_with_a_nan_scale_is_refused():
    raw = bf16_bits(q4_1(2, 0), "up")
    payload = bytearray(Grid().encode(memoryview(raw)))
    scales = np.frombuffer(bf16_bits(q4_1(2, 0), "up"), np.uint16)  # find the scales section: the second one
    first = struct.unpack_from("<BQ", payload, 0)[1]
    at = 9 + first + 9  # header of section 2, then its body (raw: 2 groups x 2 float16)
    assert struct.unpack_from("<BQ", payload, 9 + first)[0] == 0 and scales.size
    payload[at:at + 2] = np.array([np.nan], "<f2").tobytes()
    with pytest.raises(FormatError, match="finite"):
        Grid().decode_into(memoryview(bytes(payload)), memoryview(bytearray(len(raw))))


def test_a_chunk_on_no_grid_takes_the_float_codec():
    """`choose` picks the codec from a tensor's first chunk; a later chunk that fits no grid is coded as floats."""
    raw = memoryview(torch.randn(4096, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
                     .view(torch.int16).numpy().tobytes())
    codec = Grid.for_data(raw, 2)
    assert not isinstance(codec, Grid) and codec.name in ("fans", "planes")
