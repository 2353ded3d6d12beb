"""Byte codecs: decode(encode(x)) == x byte for byte, parameters checked as they are read, and hostile payloads
either raise FormatError or decode to exactly what a reference decoder gives."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fans_reference import reference_decode
from modelpress.codecs import (
    NATIVE_AVAILABLE,
    Aligned,
    Codec,
    Fans,
    Grid,
    Planes,
    Raw,
    Xor,
    Zstd,
    choose,
    codec_class,
    codec_from,
    codec_names,
    delta_codec,
    pays,
    register,
)
from modelpress.errors import FormatError

WIDTHS = (1, 2, 4, 8)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
NATIVE = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="the fans codec's C extension is not built")
WIDE = {"planes": WIDTHS, "xor": WIDTHS, "fans": (1, 2, 4)}  # codecs that take a width, and the widths they take


def element_codecs(widths=(1, 2, 4, 8), codecs=("planes", "xor", "fans")):
    """(codec, width) pairs for the codecs with a `width` parameter; fans only where its C extension is built."""
    return [pytest.param(c, w, id=f"{c}-{w}", marks=[NATIVE] if c == "fans" else [])
            for c in codecs for w in WIDE[c] if w in widths]


def make(codec: str, width=None) -> Codec:
    """The codec of that name, its parameters read as from a file (so bad ones raise FormatError)."""
    return codec_from(codec, {"width": width} if codec in WIDE else {})


def encode(codec: str, raw: bytes, width: int | None = None, base: bytes | None = None) -> bytes:
    return make(codec, width).encode(memoryview(raw), memoryview(base) if base is not None else None)


def decode(codec: str, payload: bytes, size: int, width: int | None = None, base: bytes | None = None) -> bytes:
    out = bytearray(size)
    make(codec, width).decode_into(memoryview(payload), memoryview(out), memoryview(base) if base is not None else None)
    return bytes(out)


def round_trip(codec: str, raw: bytes, width: int | None = None, base: bytes | None = None) -> bytes:
    return decode(codec, encode(codec, raw, width, base), len(raw), width, base)


def whole_elements(width: int, max_elements: int = 300):
    return st.integers(0, max_elements).flatmap(lambda n: st.binary(min_size=n * width, max_size=n * width))


# ---------------------------------------------------------------- lossless round trips

def test_registry_names_match_the_codecs():
    assert set(codec_names()) == {"raw", "aligned", "zstd", "planes", "xor", "fans", "grid"}
    assert set(codec_names(per_tensor_only=True)) == {"raw", "aligned", "zstd", "planes", "fans"}
    assert all(codec_class(name).name == name for name in codec_names())


EXAMPLES_OF_EACH = [Raw(), Aligned(4096, "0" * 32), Aligned(64, "ab" * 16), Zstd(), Planes(1), Planes(8), Xor(2),
                    Fans(1), Fans(4), Grid(), Grid(2, 8, "even")]


@pytest.mark.parametrize("codec", EXAMPLES_OF_EACH, ids=repr)
def test_parameters_round_trip_through_what_files_record(codec):
    assert codec_from(codec.name, codec.params()) == codec
    assert hash(codec_from(codec.name, codec.params())) == hash(codec)  # frozen: usable as a key


@pytest.mark.parametrize("name, params", [
    ("raw", {"width": 4}), ("zstd", None), ("zstd", []), ("planes", {}), ("planes", {"width": 4, "x": 1}),
    ("planes", {"width": 3}), ("planes", {"width": 4.0}), ("planes", {"width": True}), ("planes", {"width": "4"}),
    ("xor", {"width": 16}), ("fans", {"width": 8}), ("aligned", {"align": 4096}),
    ("aligned", {"align": 4095, "xxh3_128": "0" * 32}), ("aligned", {"align": 1 << 17, "xxh3_128": "0" * 32}),
    ("aligned", {"align": 4096, "xxh3_128": "0" * 31}), ("aligned", {"align": 4096, "xxh3_128": "G" * 32}),
    ("lz4", {}), (None, {}), (5, {})])
def test_parameters_a_file_gives_are_checked(name, params):
    with pytest.raises(FormatError):
        codec_from(name, params)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="twice"):
        register(type("Again", (Raw,), {"name": "raw"}))


def test_payloads_state_their_decoded_size_where_they_can():
    raw = memoryview(bytes(range(256)) * 8)
    for codec in (Raw(), Aligned.for_data(raw, 1), Zstd()) + ((Fans(2),) if NATIVE_AVAILABLE else ()):
        assert codec.declared_size(memoryview(codec.encode(raw))) == len(raw), codec
    assert Planes(4).declared_size(memoryview(Planes(4).encode(raw))) is None
    with pytest.raises(FormatError):
        Zstd().declared_size(memoryview(b"not zstd"))
    with pytest.raises(FormatError, match="does not declare"):
        Zstd().declared_size(memoryview(zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 99)))


def test_aligned_carries_a_check_of_its_bytes():
    raw = memoryview(bytes(range(200)))
    codec = Aligned.for_data(raw, 1)
    assert codec.alignment == 4096 and codec.check(raw) is True
    assert codec.check(memoryview(bytes(200))) is False
    assert Zstd().check(raw) is None and Raw().alignment == 1


def test_coding_pays_from_two_percent():
    assert pays(98, 100) and not pays(99, 100) and pays(0, 0)


@pytest.mark.parametrize("width", [2, 4])
def test_choose_picks_the_smallest_that_pays(width):
    weights = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(
        torch.float16 if width == 2 else torch.float32)
    sample = memoryview(weights.view(torch.uint8).numpy())
    chosen = choose(sample, width, floating=True)
    assert chosen == (Fans(width) if NATIVE_AVAILABLE else Planes(width))
    assert choose(memoryview(bytes(4096)), width, floating=False) == Zstd()  # integers: zstd or raw only
    noise = memoryview(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert choose(noise, width, floating=True) == Raw()
    assert delta_codec(width) == Xor(width)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@FUZZ
@given(raw=st.binary(max_size=5000))
def test_byte_codecs_round_trip_random_bytes(codec, raw):
    assert round_trip(codec, raw) == raw


@pytest.mark.parametrize("codec, width", element_codecs())
@FUZZ
@given(data=st.data())
def test_element_codecs_round_trip_random_bytes(codec, width, data):
    raw = data.draw(whole_elements(width))
    base = data.draw(st.binary(min_size=len(raw), max_size=len(raw))) if codec == "xor" else None
    assert round_trip(codec, raw, width, base) == raw


@pytest.mark.parametrize("codec, width", element_codecs())
@FUZZ
@given(data=st.data())
def test_element_codecs_round_trip_skewed_bytes(codec, width, data):
    """Few distinct byte values, long runs: what the entropy coders' tables and constant planes are for."""
    n = data.draw(st.integers(0, 600))
    alphabet = data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    raw = rng.choice(np.array(alphabet, dtype=np.uint8), size=n * width).tobytes()
    assert round_trip(codec, raw, width, bytes(len(raw)) if codec == "xor" else None) == raw


FLOAT_DTYPES = {"float32": (torch.float32, 32), "float16": (torch.float16, 16), "bfloat16": (torch.bfloat16, 32)}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@FUZZ
@given(data=st.data())
def test_planes_and_xor_round_trip_random_floats(dtype, data):
    torch_dtype, hyp_width = FLOAT_DTYPES[dtype]
    values = data.draw(st.lists(st.floats(width=hyp_width, allow_nan=True, allow_infinity=True), max_size=200))
    t = torch.tensor(values, dtype=torch.float32).to(torch_dtype)  # bf16: fp32 values rounded, specials kept
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    nudged = (t.float() * 1.001).to(torch_dtype)  # a "fine-tuned" base: same size, nearby values
    base = nudged.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    width = t.element_size()
    assert round_trip("planes", raw, width) == raw
    assert round_trip("xor", raw, width, base) == raw
    assert round_trip("zstd", raw) == raw
    if NATIVE_AVAILABLE:
        assert round_trip("fans", raw, width) == raw


def _patterns(dtype: torch.dtype, words: list[int]) -> bytes:
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty(0, dtype=dtype).element_size()]
    signed = [w - (1 << (8 * int_dtype.itemsize)) if w >= 1 << (8 * int_dtype.itemsize - 1) else w for w in words]
    return torch.tensor(signed, dtype=int_dtype).view(dtype).view(torch.uint8).numpy().tobytes()


# NaNs with payloads and both signs, infinities, -0.0, the smallest subnormal, the largest finite value.
SPECIAL_BITS = {
    "float16": (torch.float16, [0x7E00, 0xFE00, 0x7C01, 0x7FFF, 0x7C00, 0xFC00, 0x8000, 0x0000, 0x0001, 0x7BFF]),
    "bfloat16": (torch.bfloat16, [0x7FC0, 0xFFC0, 0x7F81, 0x7FFF, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x7F7F]),
    "float32": (torch.float32, [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0x7F800000, 0xFF800000,
                                0x80000000, 0x00000000, 0x00000001, 0x7F7FFFFF]),
    "float64": (torch.float64, [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF0000000000000,
                                0xFFF0000000000000, 0x8000000000000000, 0x0000000000000001, 0x7FEFFFFFFFFFFFFF]),
}


@pytest.mark.parametrize("dtype, codec", [
    pytest.param(d, c, id=f"{d}-{c}", marks=[NATIVE] if c == "fans" else [])
    for d in SPECIAL_BITS for c in ("raw", "zstd", "planes", "xor", "fans") if not (c == "fans" and d == "float64")])
def test_special_float_bit_patterns_survive_exactly(dtype, codec):
    torch_dtype, words = SPECIAL_BITS[dtype]
    raw = _patterns(torch_dtype, words * 3)
    width = torch.empty(0, dtype=torch_dtype).element_size()
    base = _patterns(torch_dtype, list(reversed(words)) * 3)
    assert round_trip(codec, raw, width, base if codec == "xor" else None) == raw


@pytest.mark.parametrize("codec, width", [pytest.param(c, None, id=c) for c in ("raw", "zstd")] + element_codecs())
@pytest.mark.parametrize("elements", [0, 1, 2, 3, 8, 9])
def test_empty_and_tiny_inputs(codec, width, elements):
    width = width or 1
    raw = bytes(range(251, 251 - elements * width, -1)) if elements else b""
    base = bytes(len(raw))
    assert round_trip(codec, raw, width, base if codec == "xor" else None) == raw


def test_planes_layout_is_msb_plane_first_with_sign_rotated_to_bit_0():
    """The codec docstring's layout, by hand: fp16 1.0 = 0x3C00 -> 0x7800, -2.0 = 0xC000 -> 0x8001."""
    raw = torch.tensor([1.0, -2.0], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    plane = struct.Struct("<BQ")
    expected = plane.pack(0, 2) + bytes([0x78, 0x80]) + plane.pack(0, 2) + bytes([0x00, 0x01])
    assert encode("planes", raw, 2) == expected


def test_planes_zstd_codes_a_plane_when_smaller():
    raw = np.zeros(4096, dtype=np.float32).tobytes()
    payload = encode("planes", raw, 4)
    mode, length = struct.unpack_from("<BQ", payload, 0)
    assert mode == 1 and length < 1024
    assert zstandard.ZstdDecompressor().decompress(payload[9:9 + length]) == bytes(4096)


def test_xor_payload_is_the_planes_payload_of_the_xor():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(256).astype(np.float32)
    raw = (base + np.float32(1e-4) * rng.standard_normal(256).astype(np.float32)).astype(np.float32)
    delta = (raw.view(np.uint8) ^ base.view(np.uint8)).tobytes()
    assert encode("xor", raw.tobytes(), 4, base.tobytes()) == encode("planes", delta, 4)
    assert len(encode("xor", raw.tobytes(), 4, base.tobytes())) < len(encode("planes", raw.tobytes(), 4))


def test_zstd_payload_is_one_standard_frame():
    raw = b"modelpress " * 100
    assert zstandard.ZstdDecompressor().decompress(encode("zstd", raw)) == raw


# ---------------------------------------------------------------- hostile payloads

def _planes_payload(width: int = 4, n: int = 16) -> bytes:
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    return encode("planes", np.arange(n, dtype=dtype).tobytes(), width)


def _rewrite_plane_header(payload: bytes, mode: int | None = None, length: int | None = None) -> bytes:
    old_mode, old_length = struct.unpack_from("<BQ", payload, 0)
    mode = old_mode if mode is None else mode
    return struct.pack("<BQ", mode, old_length if length is None else length) + payload[9:]


HOSTILE = {
    "raw: fewer bytes than the catalogue": ("raw", b"abc", 4, None, None),
    "raw: more bytes than the catalogue": ("raw", b"abcde", 4, None, None),
    "zstd: garbage": ("zstd", b"not a zstd frame at all", 10, None, None),
    "zstd: empty payload": ("zstd", b"", 10, None, None),
    "zstd: truncated frame": ("zstd", zstandard.ZstdCompressor().compress(bytes(range(200)))[:-3], 200, None, None),
    "zstd: decodes to fewer bytes": ("zstd", zstandard.ZstdCompressor().compress(b"x" * 50), 100, None, None),
    "zstd: decodes to more bytes": ("zstd", zstandard.ZstdCompressor().compress(b"x" * 150), 100, None, None),
    "zstd: no content size, too long": (
        "zstd", zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 500), 100, None, None),
    "planes: empty payload": ("planes", b"", 64, 4, None),
    "planes: truncated plane header": ("planes", _planes_payload()[:5], 64, 4, None),
    "planes: truncated plane data": ("planes", _planes_payload()[:-1], 64, 4, None),
    "planes: trailing bytes": ("planes", _planes_payload() + b"\x00", 64, 4, None),
    "planes: bad plane mode": ("planes", _rewrite_plane_header(_planes_payload(), mode=2), 64, 4, None),
    "planes: plane length past the end": ("planes", _rewrite_plane_header(_planes_payload(), length=1 << 40),
                                          64, 4, None),
    "planes: plane length 2**64-1": ("planes", _rewrite_plane_header(_planes_payload(), length=(1 << 64) - 1),
                                     64, 4, None),
    "planes: zstd mode on raw data": ("planes", _rewrite_plane_header(_planes_payload(), mode=1), 64, 4, None),
    "planes: wrong element count": ("planes", _planes_payload(n=16), 60, 4, None),
    "planes: output not whole elements": ("planes", _planes_payload(n=16), 62, 4, None),
    "planes: width 3": ("planes", _planes_payload(), 64, 3, None),
    "planes: width missing": ("planes", _planes_payload(), 64, None, None),
    "planes: width as text": ("planes", _planes_payload(), 64, "4", None),
    "xor: no base": ("xor", _planes_payload(), 64, 4, None),
    "xor: base of another size": ("xor", _planes_payload(), 64, 4, bytes(32)),
    "xor: bad delta payload": ("xor", b"\x07" * 30, 64, 4, bytes(64)),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_payload_raises_format_error(case):
    codec, payload, size, width, base = HOSTILE[case]
    with pytest.raises(FormatError):
        decode(codec, payload, size, width, base)


def test_unknown_codec_name_is_a_format_error():
    with pytest.raises(FormatError, match="unknown codec 'lz4'"):
        codec_class("lz4")


def reference_planes(payload: bytes, size: int, width: int) -> bytes:
    """The planes layout of planes.py's docstring, read in plain Python (asserts: for payloads known to decode)."""
    n, pos, planes = size // width, 0, []
    for _ in range(width):
        mode, length = struct.unpack_from("<BQ", payload, pos)
        data = payload[pos + 9:pos + 9 + length]
        planes.append(data if mode == 0 else zstandard.ZstdDecompressor().decompress(data))
        pos += 9 + length
    assert pos == len(payload) and all(len(p) == n for p in planes)
    out = bytearray()
    for i in range(n):
        y = int.from_bytes(bytes(p[i] for p in planes), "big")  # plane 0 is the most significant byte
        y = y >> 1 | (y & 1) << (8 * width - 1)  # the sign back from bit 0
        out += y.to_bytes(width, "little")
    return bytes(out)


def reference(codec: str, payload: bytes, size: int, width: int | None, base: bytes) -> bytes:
    if codec == "raw":
        return payload
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompress(payload)
    if codec == "planes":
        return reference_planes(payload, size, width)
    if codec == "xor":
        return bytes(a ^ b for a, b in zip(reference_planes(payload, size, width), base))
    return reference_decode(payload, width)


def _plausible(codec: str, width: int | None, size: int, data) -> bytes:
    """A payload near valid ones (so that some decode): a valid payload of random bytes, mutated."""
    raw = data.draw(st.binary(min_size=size, max_size=size))
    payload = bytearray(encode(codec, raw, width, bytes(size) if codec == "xor" else None))
    for _ in range(data.draw(st.integers(0, 3))):
        if payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    return bytes(payload[:data.draw(st.integers(0, len(payload)))])


@pytest.mark.parametrize("codec, width", [("raw", None), ("zstd", None), ("planes", 4), ("planes", 2), ("xor", 4),
                                          pytest.param("fans", 4, marks=NATIVE), pytest.param("fans", 1, marks=NATIVE)])
@FUZZ
@given(size=st.integers(0, 256), data=st.data())
def test_random_payloads_decode_exactly_or_raise_format_errors(codec, width, size, data):
    size -= size % (width or 1)
    payload = data.draw(st.one_of(st.binary(max_size=400), st.just(None)))
    if payload is None:
        payload = _plausible(codec, width, size, data)
    base = bytes(range(256))[:size]
    try:
        got = decode(codec, payload, size, width, base)
    except FormatError:
        return
    assert got == reference(codec, payload, size, width, base)


def _fans_payload(width: int = 4, n: int = 64) -> bytes:
    raw = torch.randn(n, generator=torch.Generator().manual_seed(0)).view(torch.uint8).numpy().tobytes()[: n * width]
    return encode("fans", raw, width)


FANS_HOSTILE = {
    "empty payload": lambda: (b"", 256, 4),
    "header only": lambda: (_fans_payload()[:6], 256, 4),
    "truncated by one byte": lambda: (_fans_payload()[:-1], 256, 4),
    "one byte appended": lambda: (_fans_payload() + b"\x00", 256, 4),
    "version 2": lambda: (b"\x02" + _fans_payload()[1:], 256, 4),
    "payload width differs from params": lambda: (_fans_payload(), 256, 2),
    "element count larger than the output": lambda: (_fans_payload(), 252, 4),
    "element count smaller than the output": lambda: (_fans_payload(), 260, 4),
    "element count 2**32-1": lambda: (_fans_payload()[:2] + b"\xff\xff\xff\xff" + _fans_payload()[6:], 256, 4),
    "plane mode 9": lambda: (_fans_payload()[:6] + b"\x09" + _fans_payload()[7:], 256, 4),
    "width 8": lambda: (_fans_payload(), 256, 8),
}


@NATIVE
@pytest.mark.parametrize("case", FANS_HOSTILE)
def test_hostile_fans_payload_raises_format_error(case):
    payload, size, width = FANS_HOSTILE[case]()
    with pytest.raises(FormatError):
        decode("fans", payload, size, width)


def _frame_with_content_size(declared: int) -> bytes:
    """A zstd frame of 256 bytes whose header declares `declared` bytes (single-segment, 8-byte size)."""
    frame = zstandard.ZstdCompressor(level=1).compress(b"a" * 256)
    descriptor = frame[4]  # after the 4-byte magic: FCS size flag (bits 7-6), single segment (5), dict id (1-0)
    assert descriptor & 0x20 and not descriptor & 0x03
    old_size = {0: 1, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    return frame[:4] + bytes([descriptor | 0xC0]) + struct.pack("<Q", declared) + frame[5 + old_size:]



def test_zstd_frame_declaring_a_huge_size_is_a_format_error():
    payload = _frame_with_content_size(1 << 62)
    assert zstandard.get_frame_parameters(payload).content_size == 1 << 62
    with pytest.raises(FormatError):
        Zstd().decode_into(memoryview(payload), memoryview(bytearray(256)))



def test_zstd_bomb_is_refused_before_it_is_decoded():
    import tracemalloc

    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))  # 64 MiB of zeros -> ~2 KiB
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            Zstd().decode_into(memoryview(bomb), memoryview(bytearray(256)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"decoding a {len(bomb)}-byte payload allocated {peak >> 20} MiB"
