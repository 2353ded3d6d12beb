"""A bounded, deterministic fuzz run (hypothesis, derandomized) over what a store reads: chunk headers, catalogue
rows of any SQLite type, and whole chunk files mutated in place. Each input either round-trips (parses to
something that writes back the same bytes or row, or reads back the stored tensor exactly) or raises one of
modelpress's errors; nothing else escapes, and the untouched versions keep reading back."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _store_hostile import assert_identical, make_seed, state
from modelpress.codecs import Aligned, Fans, Planes, Raw, Xor, Zstd
from modelpress.errors import FormatError, ModelpressError
from modelpress.store import Store
from modelpress.store.objects import MAGIC, ChunkHeader, chunk_path
from modelpress.store.rows import ChunkRow, chunk_row, file_row, tensor_row, version_info

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
IDS = st.sampled_from(["ab" * 32, "0" * 64, "f" * 64])
SQLITE_VALUES = st.one_of(st.none(), st.integers(-(1 << 63), (1 << 63) - 1), st.floats(allow_nan=True),
                          st.text(max_size=80), st.binary(max_size=40), IDS)
CODECS = [Raw(), Zstd(), Planes(4), Planes(2), Xor(4), Fans(2), Aligned(4096, "0" * 32), Aligned(64, "1" * 32)]


def _canonical(fields: dict) -> bytes:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(body)) + body


HEADER_FIELDS = st.fixed_dictionaries({
    "base": st.one_of(st.none(), IDS, st.text(max_size=70), st.integers()),
    "codec": st.one_of(st.sampled_from(["raw", "zstd", "planes", "xor", "fans", "aligned", "lz4"]), st.integers()),
    "params": st.one_of(st.sampled_from([c.params() for c in CODECS]),
                        st.dictionaries(st.sampled_from(["width", "align", "xxh3_128", "x"]),
                                        st.one_of(st.integers(-5, 70000), st.text(max_size=33), st.booleans()),
                                        max_size=3),
                        st.lists(st.integers(), max_size=2)),
    "raw_size": st.one_of(st.integers(-5, (1 << 41)), st.floats(), st.booleans(), st.text(max_size=5)),
})


def _check_header(data: bytes) -> None:
    """Parse: on success the header writes back exactly the bytes it was read from (up to its payload)."""
    try:
        header, offset = ChunkHeader.parse(memoryview(data), "chunk fuzz")
    except FormatError as exc:
        assert "chunk fuzz" in str(exc)
        return
    assert header.head() == data[:offset]


@FUZZ
@given(fields=HEADER_FIELDS, padding=st.one_of(st.binary(max_size=64), st.just(bytes(70000))))
def test_chunk_headers_round_trip_or_raise_format_error(fields, padding):
    _check_header(_canonical(fields) + padding)


@FUZZ
@given(codec=st.sampled_from(CODECS), raw_size=st.integers(0, 1 << 20), base=st.one_of(st.none(), IDS),
       cuts=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, 5000), tail=st.binary(max_size=16))
def test_mutated_valid_headers_round_trip_or_raise_format_error(codec, raw_size, base, cuts, cut, tail):
    data = bytearray(ChunkHeader(codec, raw_size, base).head() + bytes(64))
    for at, value in cuts:
        if at < len(data):
            data[at] = value
    _check_header(bytes(data[:cut]) + tail)


def _spoiled(data, valid: tuple, values=SQLITE_VALUES) -> tuple:
    """`valid` with each field, now and then, replaced by any value SQLite can hold."""
    return tuple(data.draw(st.one_of(st.just(v), values)) if data.draw(st.integers(0, 3)) == 0 else v
                 for v in valid)


@FUZZ
@given(codec=st.sampled_from(CODECS), sizes=st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 41)),
       data=st.data())
def test_chunk_rows_of_any_types_parse_or_raise_format_error(codec, sizes, data):
    cid = data.draw(st.one_of(IDS, st.just("ab" * 32)))
    valid = (codec.name, json.dumps(codec.params()), *sizes, ("cd" * 32) if codec.delta else None)
    row = _spoiled(data, valid)
    try:
        parsed = chunk_row(cid, row)
    except FormatError:
        return
    assert isinstance(parsed, ChunkRow)
    assert (parsed.id, parsed.codec.name, parsed.codec.params(), parsed.raw_size, parsed.stored_size, parsed.base) \
        == (cid, row[0], json.loads(row[1]), row[2], row[3], row[4])


@FUZZ
@given(shape=st.lists(st.integers(0, 1 << 40), max_size=16), chunks=st.lists(IDS, max_size=4), data=st.data())
def test_tensor_rows_of_any_types_parse_or_raise_format_error(shape, chunks, data):
    wrong_lists = st.lists(st.one_of(st.integers(-2, 1 << 41), st.floats(), st.text(max_size=2), IDS), max_size=18)
    row = _spoiled(data, ("w", "float32", json.dumps(shape), json.dumps(chunks)),
                   st.one_of(SQLITE_VALUES, wrong_lists.map(json.dumps)))
    try:
        record = tensor_row("ab" * 32, row)
    except FormatError:
        return
    assert (record.name, record.dtype, list(record.shape), list(record.chunks)) == (
        row[0], row[1], json.loads(row[2]), json.loads(row[3]))


PATHS = ["tokenizer.json", "1_Pooling/config.json", "../x", "/etc/x", "a//b", "a/./b", "a\\b", "", "a/..", "x\0y"]


@FUZZ
@given(data=st.data())
def test_file_and_version_rows_of_any_types_parse_or_raise_format_error(data):
    path, chunk = _spoiled(data, (data.draw(st.sampled_from(PATHS)), "ab" * 32))
    try:
        assert file_row("ab" * 32, (path, chunk)) == (path, chunk)
        assert ".." not in path.split("/") and not path.startswith("/") and "\\" not in path
    except FormatError:
        pass
    version = _spoiled(data, ("ab" * 32, "model", data.draw(st.one_of(st.none(), IDS)),
                              data.draw(st.one_of(st.integers(0, 1 << 40), st.floats(0, 1e10))), "a message"))
    try:
        info = version_info(version, ())
    except FormatError:
        return
    assert (info.id, info.model, info.parent, info.created, info.message) == version[:3] + (float(version[3]),
                                                                                            version[4])


# ---------------------------------------------------------------- whole chunk files, mutated in a real store

@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory):
    """A store with one tensor per codec (and an xor delta), and each tensor's version and chunk."""
    root = tmp_path_factory.mktemp("fuzz") / "store"
    seed = make_seed(root)
    tensors = {"z": torch.arange(300, dtype=torch.int32), "p": torch.randn(40, 8), "r": torch.randn(4),
               "a": torch.randn(1024)}
    with Store(root) as s:
        vid = s.put(tensors, "t", codecs={"z": "zstd", "p": "planes", "r": "raw", "a": "aligned"})
        chunks = {t.name: t.chunks[0] for t in s.catalog.tensors(vid)}
        chunks["xor"] = s.catalog.tensors(s.resolve("m"))[0].chunks[0]
        assert s.catalog.chunk(chunks["xor"]).codec.name == "xor"
    return root, seed, tensors, chunks


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@pytest.mark.slow  # the bounded fuzz run: make test, not test-fast
@given(which=st.sampled_from(["z", "p", "r", "a", "xor"]), data=st.data())
def test_mutated_chunk_files_read_back_exactly_or_raise_modelpress_errors(fuzz_store, which, data):
    root, seed, tensors, chunks = fuzz_store
    path = chunk_path(root, chunks[which])
    original = path.read_bytes()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(mutated) - 1))
        mutated[at] = data.draw(st.integers(0, 255))
    mutated = mutated[:data.draw(st.integers(0, len(mutated)))] + data.draw(st.binary(max_size=8))
    path.write_bytes(bytes(mutated))
    try:
        with Store(root) as s:
            model, vid = ("m", s.resolve("m")) if which == "xor" else ("t", s.resolve("t"))
            want = state("m", 1) if which == "xor" else tensors
            try:
                got = s.get(model, vid)
            except ModelpressError:
                assert bytes(mutated) != original
            else:  # a change the content's hash cannot see (in bytes a decoder skips) reads back exactly...
                assert_identical(got, want)
            assert (chunks[which] in s.verify().corrupt) == (bytes(mutated) != original)  # ...and verify sees it
            for vid_, step in seed.versions.items():
                if which != "xor" or step == 0:
                    assert_identical(s.get("m", vid_), state("m", step))
    finally:
        path.write_bytes(original)
        shutil.rmtree(root / "tmp", ignore_errors=True)
