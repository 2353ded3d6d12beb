"""The `fans` codec (modelpress.codecs._fcodec): exact round trips, the payload layout as documented, the
entropy it reaches, hostile payloads, and threads.

A plain-Python reader written from the Fans docstring (fans_reference.py) decodes real payloads, so the spec and
the C code cannot drift apart; the AVX2 and scalar paths must write identical payloads.
"""

from __future__ import annotations

import mmap
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fans_reference import CONST, JOINT, LOW6, ORDER0, RAW, _order0_table, _u32, plane_modes, reference_decode
from modelpress.codecs import NATIVE_AVAILABLE, Fans, Planes
from modelpress.codecs import fans as fans_module
from modelpress.errors import FormatError, ModelpressError, UnsupportedError

if NATIVE_AVAILABLE:
    from modelpress.codecs import _fcodec

EXAMPLES = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
BLOCK = 8192  # the decoder's block, so sizes around it cross block boundaries
rng = np.random.default_rng(0)


def encode(raw: bytes, width: int) -> bytes:
    return Fans(width).encode(memoryview(raw))


def decode(payload: bytes, size: int, width: int) -> bytes:
    out = bytearray(size)
    Fans(width).decode_into(memoryview(payload), memoryview(out))
    return bytes(out)


def round_trip(raw: bytes, width: int) -> bytes:
    return decode(encode(raw, width), len(raw), width)


@pytest.fixture(autouse=True)
def _native(request):
    """Every test here needs the C extension, except the one about its absence."""
    if not NATIVE_AVAILABLE and "without_the_extension" not in request.node.name:
        pytest.skip("modelpress.codecs._fcodec is not built (no C compiler at install time)")


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws from a freshly seeded `rng`, whichever tests ran before it (-k, -m)."""
    global rng
    rng = np.random.default_rng(0)


@pytest.fixture
def scalar_only():
    """Run with the AVX2 paths switched off (a no-op on CPUs without AVX2)."""
    before = _fcodec._simd()
    _fcodec._simd(False)
    yield
    _fcodec._simd(before)


# ---------------------------------------------------------------- test data

def bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns: the top half of float32 (truncation keeps NaN payloads and -0)."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def floats(values, dtype: str) -> bytes:
    """The values cast to dtype (out-of-range values become infinities, as a cast does)."""
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.asarray(values, dtype=np.float64)
        if dtype == "bfloat16":
            return bf16_bits(x).tobytes()
        return x.astype(dtype).tobytes()


WIDTH = {"float32": 4, "float16": 2, "bfloat16": 2}


def gaussian(n: int, dtype: str, std: float = 0.04) -> bytes:
    return floats(rng.normal(0, std, n), dtype)


def model_pieces(dtype: str) -> list[bytes]:
    """Weight-like chunks: Gaussian rows, rows rounded to fp16 precision, near-constant norms."""
    rounded = np.asarray(rng.normal(0, 0.04, 20_000), dtype=np.float16).astype(np.float64)
    return [gaussian(30_000, dtype), floats(rounded, dtype), floats(1 + rng.normal(0, 1e-3, 384), dtype),
            floats(np.concatenate([rng.normal(0, 0.04, 5000), np.zeros(5000)]), dtype)]


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("width", [1, 2, 4])
@EXAMPLES
@given(data=st.data())
def test_random_bytes_round_trip(width, data):
    n = data.draw(st.integers(0, 700))
    raw = data.draw(st.binary(min_size=n * width, max_size=n * width))
    assert round_trip(raw, width) == raw


@pytest.mark.parametrize("dtype", list(WIDTH))
@EXAMPLES
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=32), max_size=600))
def test_float_tensors_round_trip(dtype, values):
    raw = floats(values, dtype)
    assert round_trip(raw, WIDTH[dtype]) == raw


@pytest.mark.parametrize("dtype", list(WIDTH))
@EXAMPLES
@given(n=st.integers(1, 5000), scale=st.sampled_from([1e-8, 1e-3, 0.04, 1.0, 3e4]), data=st.data())
def test_skewed_float_tensors_round_trip(dtype, n, scale, data):
    kind = data.draw(st.sampled_from(["gaussian", "equal", "uniform bits", "sparse"]))
    if kind == "gaussian":
        raw = floats(np.random.default_rng(n).normal(0, scale, n), dtype)
    elif kind == "equal":
        raw = floats([data.draw(st.sampled_from([0.0, -0.0, 1.5, float("nan"), float("-inf")]))] * n, dtype)
    elif kind == "uniform bits":
        raw = np.random.default_rng(n).integers(0, 256, n * WIDTH[dtype], dtype=np.uint8).tobytes()
    else:
        x = np.random.default_rng(n).normal(0, scale, n)
        x[np.random.default_rng(n + 1).random(n) < 0.9] = 0
        raw = floats(x, dtype)
    assert round_trip(raw, WIDTH[dtype]) == raw


@pytest.mark.parametrize("n", [0, 1, 7, 9, 31, 33, 63, 64, 65, 103, 104, 1000, BLOCK - 1, BLOCK + 5, 2 * BLOCK + 37])
@pytest.mark.parametrize("dtype", list(WIDTH))
def test_lengths_round_trip(n, dtype):
    """Lengths around the 32 lanes, the 4-element LOW6 groups, the coder's minimum and the blocks."""
    raw = gaussian(n, dtype)
    assert round_trip(raw, WIDTH[dtype]) == raw


@pytest.mark.parametrize("dtype", list(WIDTH))
def test_weight_like_chunks_round_trip(dtype):
    for raw in model_pieces(dtype):
        assert round_trip(raw, WIDTH[dtype]) == raw


def test_encode_accepts_any_contiguous_buffer():
    raw = gaussian(1000, "float32")
    expected = encode(raw, 4)
    for buffer in (bytearray(raw), memoryview(raw), np.frombuffer(raw, np.float32)):
        assert _fcodec.encode(buffer, 4) == expected


# ---------------------------------------------------------------- the payload layout

def test_header_and_trivial_planes_are_the_documented_bytes():
    assert encode(b"", 4) == bytes([1, 4, 0, 0, 0, 0, RAW, RAW, RAW, RAW])
    assert encode(bytes([7]) * 5, 1) == bytes([1, 1, 5, 0, 0, 0, CONST, 7])
    assert encode(bytes([1, 2, 3]), 1) == bytes([1, 1, 3, 0, 0, 0, RAW, 1, 2, 3])
    # 1.0f32 = 0x3f800000 rotated left by one bit: 0x7f000000, planes 7f, 00, 00, 00
    assert encode(floats([1.0] * 3, "float32"), 4) == bytes([1, 4, 3, 0, 0, 0, CONST, 0x7F, CONST, 0, CONST, 0, CONST, 0])
    # -1.0: the sign moves to bit 0 of the lowest plane
    assert encode(floats([-1.0] * 3, "float32"), 4)[-2:] == bytes([CONST, 1])


@pytest.mark.parametrize("dtype, modes", [("float32", [JOINT, LOW6, RAW, RAW]), ("bfloat16", [JOINT, LOW6]),
                                          ("float16", [ORDER0, RAW])])
def test_weights_take_the_expected_modes(dtype, modes):
    assert plane_modes(encode(gaussian(100_000, dtype), WIDTH[dtype]), WIDTH[dtype]) == modes


def test_rounded_rows_code_the_low_planes():
    """fp32 values that are exact fp16 values have 13 zero low bits: the low planes are coded."""
    raw = floats(np.asarray(rng.normal(0, 0.04, 50_000), np.float16), "float32")
    assert plane_modes(encode(raw, 4), 4)[2:] == [ORDER0, ORDER0]


@pytest.mark.parametrize("dtype", list(WIDTH))
def test_reference_reader_decodes_real_payloads(dtype):
    width = WIDTH[dtype]
    for raw in [gaussian(1500, dtype), floats(np.asarray(rng.normal(0, 0.04, 1200), np.float16), dtype),
                floats(rng.normal(0, 1, 900).round(), dtype)]:
        assert reference_decode(encode(raw, width), width) == raw


def test_reference_reader_decodes_order0_bytes():
    raw = np.minimum(rng.geometric(0.3, 3000), 255).astype(np.uint8).tobytes()
    payload = encode(raw, 1)
    assert plane_modes(payload, 1) == [ORDER0]
    assert reference_decode(payload, 1) == raw


@pytest.mark.parametrize("dtype", list(WIDTH))
def test_avx2_and_scalar_paths_write_the_same_payload(dtype, request):
    width = WIDTH[dtype]
    pieces = model_pieces(dtype) + [gaussian(n, dtype) for n in (100, 1000, BLOCK + 3)]
    fast = [encode(raw, width) for raw in pieces]
    request.getfixturevalue("scalar_only")
    assert [encode(raw, width) for raw in pieces] == fast
    assert [decode(p, len(raw), width) for p, raw in zip(fast, pieces)] == pieces


def fp16_with_low_plane(n: int, low: str) -> bytes:
    """fp16 bit patterns: a skewed top byte after rotation (plane 0), and a low byte (plane 1) that is noise
    ("raw") or always zero ("const")."""
    g = np.random.default_rng(n)
    top = g.choice([0x70, 0x71, 0x72, 0x78, 0x3C], n, p=[0.5, 0.2, 0.1, 0.1, 0.1])  # exponent, 3 mantissa bits
    rotated = top << 8 | (g.integers(0, 256, n) if low == "raw" else 0)
    return (rotated >> 1 | (rotated & 1) << 15).astype(np.uint16).tobytes()


@pytest.mark.parametrize("low, modes", [("raw", [ORDER0, RAW]), ("const", [ORDER0, CONST])])
@pytest.mark.parametrize("n", [400, 415, 416, 417, BLOCK - 1, BLOCK, BLOCK + 33, 3 * BLOCK + 5])
def test_fp16_planes_joined_while_decoding_match_the_scalar_path(low, modes, n, request):
    """Plane 0 order-0 with plane 1 stored: the AVX2 decoder joins the planes as it decodes symbols."""
    raw = fp16_with_low_plane(n, low)
    payload = encode(raw, 2)
    assert plane_modes(payload, 2) == modes
    assert decode(payload, len(raw), 2) == raw
    if n < BLOCK:
        assert reference_decode(payload, 2) == raw
    request.getfixturevalue("scalar_only")
    assert decode(payload, len(raw), 2) == raw


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1000, 1023, 1024, 1025, BLOCK - 33, BLOCK - 1, BLOCK, BLOCK + 1, BLOCK + 40, 2 * BLOCK + 17])
def test_joint_planes_joined_while_decoding_match_the_scalar_path(dtype, n, request):
    """Plane 0 joint: the AVX2 decoder joins each group of symbols with the low-6 string (and, for fp32, planes
    2 and 3) as it decodes, up to where a group's low-6 bytes would run past the string; the rest is joined after.
    (The top two mantissa bits are cleared, so that the joint mode pays even for small n.)"""
    x = np.random.default_rng(n).normal(0, 0.04, n)
    if dtype == "float32":
        raw = (x.astype(np.float32).view(np.uint32) & np.uint32(~(3 << 21) & 0xFFFFFFFF)).tobytes()
    else:
        raw = (bf16_bits(x) & np.uint16(~(3 << 5) & 0xFFFF)).tobytes()
    payload = encode(raw, WIDTH[dtype])
    assert plane_modes(payload, WIDTH[dtype])[:2] == [JOINT, LOW6]
    assert decode(payload, len(raw), WIDTH[dtype]) == raw
    if n < 1100:
        assert reference_decode(payload, WIDTH[dtype]) == raw
    request.getfixturevalue("scalar_only")
    assert decode(payload, len(raw), WIDTH[dtype]) == raw


def decode_at(payload: bytes, size: int, width: int, misalign: int) -> bytes:
    """Decode into page-aligned memory (plus `misalign` bytes), as the store's loader does into its arena."""
    with mmap.mmap(-1, size + 64) as buffer:
        view = memoryview(buffer)
        try:
            Fans(width).decode_into(memoryview(payload), view[misalign:misalign + size])
            return bytes(view[misalign:misalign + size])
        finally:
            view.release()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "bytes"])
def test_large_outputs_streamed_past_the_cache_match_plain_stores(dtype, request):
    """Outputs of 256 KiB or more on a 32-byte boundary are written with non-temporal stores; a misaligned
    output, the scalar path and the reference reader must all agree with them, tails included."""
    n = (1 << 18) // 2 + 8 * BLOCK + 37
    x = np.random.default_rng(n).normal(0, 0.04, n)
    if dtype == "float16":  # plane 0 order-0, plane 1 stored: joined as decoded
        raw, width = fp16_with_low_plane(n, "raw"), 2
    elif dtype == "bytes":
        raw, width = np.minimum(rng.geometric(0.3, 2 * n), 255).astype(np.uint8).tobytes(), 1
    elif dtype == "float32":  # joint planes (top two mantissa bits cleared so that the joint mode pays)
        raw, width = (x.astype(np.float32).view(np.uint32) & np.uint32(~(3 << 21) & 0xFFFFFFFF)).tobytes(), 4
    else:
        raw, width = (bf16_bits(x) & np.uint16(~(3 << 5) & 0xFFFF)).tobytes(), 2
    payload = encode(raw, width)
    assert plane_modes(payload, width)[0] == {"float16": ORDER0, "bytes": ORDER0}.get(dtype, JOINT)
    assert len(raw) >= 1 << 18
    assert decode_at(payload, len(raw), width, 0) == raw
    assert decode_at(payload, len(raw), width, 16) == raw
    request.getfixturevalue("scalar_only")
    assert decode_at(payload, len(raw), width, 0) == raw


# ---------------------------------------------------------------- how small

def order0_bound(raw: bytes) -> float:
    """n * H(byte distribution) / 8: the best any order-0 byte coder can do."""
    counts = np.bincount(np.frombuffer(raw, np.uint8), minlength=256)
    p = counts[counts > 0] / len(raw)
    return len(raw) * float(-(p * np.log2(p)).sum()) / 8


@pytest.mark.parametrize("p", [0.3, 0.7, 0.95])
def test_skewed_bytes_code_within_one_percent_of_their_entropy(p):
    raw = np.minimum(np.random.default_rng(1).geometric(p, 1 << 20) - 1, 255).astype(np.uint8).tobytes()
    assert len(encode(raw, 1)) <= 1.01 * order0_bound(raw)


def test_weights_beat_the_planes_codec():
    for dtype, width in WIDTH.items():
        raw = gaussian(250_000, dtype)
        assert len(encode(raw, width)) < len(Planes(width).encode(memoryview(raw)))


def test_random_bytes_grow_by_a_few_bytes_only():
    raw = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    for width in (1, 2, 4):
        assert len(encode(raw, width)) <= len(raw) + 6 + width


# ---------------------------------------------------------------- hostile payloads

def _payload(dtype: str = "bfloat16", n: int = 2000) -> bytes:
    return encode(gaussian(n, dtype), WIDTH[dtype])


def _edit(payload: bytes, pos: int, value: bytes) -> bytes:
    return payload[:pos] + value + payload[pos + len(value):]


HOSTILE = {  # name: (payload, decoded size, width, what the message must say)
    "empty": (lambda: b"", 0, 2, "shorter than its header"),
    "version 2": (lambda: _edit(_payload(), 0, b"\x02"), 4000, 2, "unknown version"),
    "width differs": (lambda: _edit(_payload(), 1, b"\x04"), 4000, 2, "width differs"),
    "count differs": (lambda: _edit(_payload(), 2, (1999).to_bytes(4, "little")), 4000, 2, "element count"),
    "unknown mode": (lambda: _edit(_payload(), 6, b"\x07"), 4000, 2, "unknown mode"),
    "LOW6 without JOINT": (lambda: _edit(_payload("float16"), 6, bytes([LOW6])), 4000, 2, "LOW6"),
    "JOINT on plane 1": (lambda: bytes([1, 2, 4, 0, 0, 0, RAW]) + bytes(4) + bytes([JOINT]), 8, 2, "joint"),
    "JOINT at width 1": (lambda: bytes([1, 1, 4, 0, 0, 0, JOINT]), 4, 1, "joint"),
    "truncated": (lambda: _payload()[:-1], 4000, 2, "truncated"),
    "trailing byte": (lambda: _payload() + b"\x00", 4000, 2, "trailing"),
    "table does not sum": (lambda: _edit(_payload("float16"), 8 + 32, b"\x05"), 4000, 2, "sum"),
    "joint frequency above 2048": (lambda: bytes([1, 2, 64, 0, 0, 0, JOINT]) + bytes([1] + [0] * 31)
                                   + bytes([1, 0x8F, 0xFF]) + bytes(200), 128, 2, "above 2048"),
    "raw plane truncated": (lambda: bytes([1, 1, 10, 0, 0, 0, RAW, 1, 2]), 10, 1, "truncated"),
    "constant plane truncated": (lambda: bytes([1, 1, 10, 0, 0, 0, CONST]), 10, 1, "truncated"),
    "zero initial state": (lambda: _zero_first_state(), 4000, 2, "initial state"),
    "stream cut short": (lambda: _shorten_stream(), 4000, 2, "ends early|unread|unexpected state|truncated"),
}


def _zero_first_state() -> bytes:
    payload = _payload("float16")
    _, pos = _order0_table(payload, 7)
    return _edit(payload, pos + 4, bytes(4))


def _shorten_stream() -> bytes:
    """Declare the order-0 stream 2 bytes shorter and drop its last word."""
    payload = _payload("float16")
    _, pos = _order0_table(payload, 7)
    length = _u32(payload, pos)
    body = payload[:pos] + (length - 2).to_bytes(4, "little") + payload[pos + 4:pos + 2 + length]
    return body + payload[pos + 4 + length:]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_payloads_raise_format_errors_that_say_why(case):
    make, size, width, reason = HOSTILE[case]
    with pytest.raises(FormatError, match=reason):
        decode(make(), size, width)


def test_native_errors_are_value_errors_and_the_codec_wraps_them():
    with pytest.raises(ValueError, match="fans codec"):
        _fcodec.decode_into(b"\x01", bytearray(4), 4)
    with pytest.raises(FormatError, match="fans chunk is corrupt"):
        decode(b"\x01", 4, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="whole number of 4-byte elements"):
        _fcodec.encode(b"abc", 4)
    with pytest.raises(ValueError, match="width must be 1, 2 or 4"):
        _fcodec.encode(b"abcdefgh", 8)
    with pytest.raises(FormatError, match="width"):
        Fans(8)
    with pytest.raises(FormatError, match="width"):
        Fans.from_params({})
    with pytest.raises(TypeError):
        _fcodec.decode_into(_payload(), b"read-only output", 2)


FUZZ_SCRIPT = textwrap.dedent("""
    import random, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from fans_reference import reference_decode
    from modelpress.codecs import Fans, _fcodec
    from modelpress.errors import FormatError
    _fcodec._simd(sys.argv[1] == "1")
    rnd = random.Random(int(sys.argv[1]))
    rng = np.random.default_rng(int(sys.argv[1]))
    decoded = refused = checked = 0

    def other_path(payload, size, width):
        # the same payload through the other decoder (AVX2 <-> scalar): both must agree
        before = _fcodec._simd()
        _fcodec._simd(not before)
        try:
            out = bytearray(size)
            Fans(width).decode_into(memoryview(payload), memoryview(out))
            return bytes(out)
        finally:
            _fcodec._simd(before)

    for trial in range(int(sys.argv[2])):
        width = rnd.choice([1, 2, 4])
        n = rnd.choice([rnd.randrange(0, 300), rnd.randrange(300, 3000), rnd.randrange(8000, 20000)])
        kind = rnd.randrange(3)
        if kind == 0:
            x = rng.normal(0, 0.04, n).astype(np.float32)
            raw = x.tobytes() if width == 4 else (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()[:n * width]
            raw = raw.ljust(n * width, b"\\0")
        elif kind == 1:
            raw = np.minimum(rng.geometric(0.4, n * width), 255).astype(np.uint8).tobytes()
        else:
            raw = rng.integers(0, 256, n * width, dtype=np.uint8).tobytes()
        good = bytearray(Fans(width).encode(memoryview(raw)))
        for _ in range(10):
            bad = bytearray(good)
            op = rnd.randrange(5)
            if op == 0 and bad:
                for _ in range(rnd.randint(1, 4)):
                    bad[rnd.randrange(len(bad))] ^= 1 << rnd.randrange(8)
            elif op == 1:
                del bad[rnd.randrange(len(bad) + 1):]
            elif op == 2:
                bad += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
            elif op == 3 and len(bad) > 6:
                pos = rnd.randrange(6, len(bad))
                bad[pos:pos + 4] = bytes(rnd.randrange(256) for _ in range(4))
            else:
                bad = bytearray(rnd.randbytes(rnd.randrange(400)))
                if len(bad) >= 6 and rnd.random() < 0.7:
                    bad[:6] = bytes([1, width]) + n.to_bytes(4, "little")
            out = bytearray(n * width)
            try:
                Fans(width).decode_into(memoryview(bytes(bad)), memoryview(out))
            except FormatError:
                refused += 1
                continue
            decoded += 1
            # a payload that decodes is a valid one: the other decoder and (for small ones) the reader written
            # from the spec must give exactly the same bytes
            assert other_path(bytes(bad), n * width, width) == bytes(out), (trial, op)
            if n * width <= 4096:
                assert reference_decode(bytes(bad), width) == bytes(out), (trial, op)
                checked += 1
    print(decoded, refused, checked)
""")


@pytest.mark.slow  # the bounded fuzz run: make test, not test-fast
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "scalar"])
def test_fuzzed_payloads_decode_or_raise_format_error_never_crash(simd):
    """Thousands of mutated payloads in a child process, so a crash fails the test, not pytest. Each either is
    refused with FormatError or decodes to what the other decoder path and the reference reader decode."""
    here = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT, str(int(simd)), "400", here], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"decoder crashed, disagreed or raised another error (rc {proc.returncode}): " \
                                 f"{proc.stderr[-2000:]}"
    decoded, refused, checked = map(int, proc.stdout.split())
    assert decoded + refused == 4000 and refused > 1500 and decoded > 100 and checked > 50


# ---------------------------------------------------------------- threads and the C extension's absence

def test_two_threads_decode_at_once():
    pieces = [gaussian(200_000, "bfloat16"), gaussian(100_000, "float32")]
    widths = [2, 4]
    payloads = [encode(raw, w) for raw, w in zip(pieces, widths)]
    results, errors = [None, None], []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                out = decode(payloads[i], len(pieces[i]), widths[i])
                assert out == pieces[i]
            results[i] = out
        except BaseException as exc:  # reported below: an assert in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == pieces


def test_without_the_extension_fans_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(fans_module, "_fcodec", None)
    with pytest.raises(UnsupportedError, match="C extension") as info:
        Fans(4).encode(memoryview(b"abcd"))
    assert isinstance(info.value, ModelpressError)
    with pytest.raises(UnsupportedError):
        Fans(4).decode_into(memoryview(b""), memoryview(bytearray()))


def test_simd_hook_reports_and_restores():
    before = _fcodec._simd()
    assert _fcodec._simd(False) is False
    _fcodec._simd(before)
    assert _fcodec._simd() is before
