"""The `aligned` layout and the fast loader: aligned chunk files byte for byte, tensors mapped from the
page cache (copy-on-write) and equal to what the general, chunk-by-chunk path decodes, hostile aligned
files refused without a crash, and the copy fallbacks when mapping is not possible."""

from __future__ import annotations

import json
import os
import struct
import sys

import blake3
import pytest
import torch
import xxhash

from _store_support import assert_identical, bits
from modelpress.codecs import NATIVE_AVAILABLE, Aligned, Fans, codec_from
from modelpress.errors import FormatError
from modelpress.store import CorruptChunkError, Store, StoreError, arena, layout, loader, reader
from modelpress.store.backend import LocalFolder
from modelpress.store.objects import ChunkHeader, chunk_id, chunk_key, chunk_path
from modelpress.store.rows import ChunkRow, TensorRecord

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux") or not arena.can_map(),
                           reason="mapping file pages into the arena needs Linux")


def state(rows: int = 3000) -> dict[str, torch.Tensor]:
    """Page-multiple rows (1536 B), odd rows (1540 B: lcm with 4 KiB is 1.5 MiB), small, 0-D, empty, bf16, ints."""
    return {"emb": torch.randn(rows, 384), "odd": torch.randn(rows // 4, 385), "bias": torch.randn(7),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "half": torch.randn(rows // 10, 64).bfloat16(),
            "ids": torch.arange(5000, dtype=torch.int64)}


def mapped_chunk_files() -> set[str]:
    """Names of the chunk files this process maps (from /proc/self/maps)."""
    with open("/proc/self/maps") as fh:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in fh if "/chunks/" in line}


def general_path(store: Store, vid: str) -> dict[str, torch.Tensor]:
    """Every tensor rebuilt chunk by chunk through the slow, general path (`ChunkReader.read`)."""
    out = {}
    for record in store.catalog.tensors(vid):
        raw = b"".join(bytes(chunk_bytes(store, cid)) for cid in record.chunks)
        dtype = layout.torch_dtype(record.dtype)
        out[record.name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(record.shape) if raw else \
            torch.empty(record.shape, dtype=dtype)
    return out


def chunk_bytes(store: Store, cid: str) -> memoryview:
    return store.reader.read(store.catalog.chunk(cid))


def aligned_params(raw, align: int = 4096) -> dict:
    return Aligned.for_data(memoryview(raw), 1, align).params()


# ---------------------------------------------------------------- chunk files and cutting

def params(align: int = 4096, check: str = "0" * 32) -> dict:
    return {"align": align, "xxh3_128": check}


def test_aligned_params_carry_the_xxh3_128_of_the_bytes():
    raw = bytes(range(256)) * 20
    assert aligned_params(raw) == {"align": 4096, "xxh3_128": xxhash.xxh3_128(raw).hexdigest()}
    assert aligned_params(raw[:-1] + b"\x01")["xxh3_128"] != aligned_params(raw)["xxh3_128"]


def test_aligned_chunk_file_is_header_zero_padding_then_payload_on_a_page(tmp_path):
    (tmp_path / "tmp").mkdir()
    raw = bytes(range(256)) * 20
    cid = chunk_id(raw)
    check = xxhash.xxh3_128(raw).hexdigest()
    header = ChunkHeader(Aligned(4096, check), len(raw))
    payload = header.codec.encode(memoryview(raw))
    assert len(payload) == len(raw)
    assert LocalFolder(tmp_path).put_if_absent(chunk_key(cid), [header.head(), payload])
    body = b'{"base":null,"codec":"aligned","params":{"align":4096,"xxh3_128":"' + check.encode() + b'"},"raw_size":5120}'
    want = b"MPCHUNK\x01" + struct.pack("<I", len(body)) + body
    want += bytes(4096 - len(want)) + raw
    assert chunk_path(tmp_path, cid).read_bytes() == want
    assert ChunkHeader.parse(want, "chunk") == (header, 4096)


@pytest.mark.parametrize("align", [64, 4096, 65536])
def test_padding_reaches_the_next_multiple_of_align(align):
    header = ChunkHeader(Aligned(align, "0" * 32), 10)
    head = header.head()
    assert len(head) % align == 0 and len(head) - len(header.to_bytes()) < align
    assert not any(head[len(header.to_bytes()):])


@pytest.mark.parametrize("bad", [{}, params(100), params(32), params(1 << 17), params(True), params(4096.0),
                                 params("4096"), {**params(), "x": 1}, {"align": 4096}, params(check="0" * 31),
                                 params(check="G" * 32), params(check=7), params(check="A" * 32)])
def test_invalid_align_parameters_are_format_errors(bad):
    with pytest.raises(FormatError, match="align"):
        codec_from("aligned", bad)
    body = json.dumps({"base": None, "codec": "aligned", "params": bad, "raw_size": 2}, sort_keys=True,
                      separators=(",", ":")).encode()
    with pytest.raises(FormatError, match="chunk x"):
        ChunkHeader.parse(memoryview(b"MPCHUNK\x01" + struct.pack("<I", len(body)) + body + bytes(70000)), "chunk x")


@pytest.mark.parametrize("nbytes, shape, itemsize, target, multiple, spans", [
    (10 * 1536, (10, 384), 4, 4000, 4096, [(0, 12288), (12288, 3072)]),  # 8 rows of 1536 B make 3 pages
    (40, (10,), 4, 16, 8, [(0, 16), (16, 16), (32, 8)]),
    (96, (4, 6), 4, 50, 1, [(0, 48), (48, 48)]),  # multiple 1: the plain row rule
    (50 * 3 * 4, (50, 3), 4, 30, 7, [(i, 84) for i in range(0, 588, 84)] + [(588, 12)]),  # lcm 84 > target
])
def test_split_rows_keeps_whole_rows_and_page_multiples(nbytes, shape, itemsize, target, multiple, spans):
    assert layout.split_rows(nbytes, shape, itemsize, target, multiple) == spans


def test_rows_too_odd_for_pages_fall_back_to_row_cuts():
    unit = 4 * 30011  # lcm with 4096 is 123 MB: not worth it
    spans = layout.split_rows(unit * 100, (100, 30011), 4, multiple=4096)
    assert all(length % unit == 0 for _, length in spans) and spans == layout.split_rows(unit * 100, (100, 30011), 4)


def test_aligned_chunks_are_larger_than_compressed_ones(store):
    """Mapped chunks cost system calls, not decoding: fewer, larger ones (ALIGNED_CHUNK_BYTES)."""
    w = torch.randn(8192, 384)  # 12 MiB
    vid = store.put({"a": w, "c": w + 1}, "m", codecs={"a": "aligned", "c": "zstd"})
    sizes = {t.name: [store.catalog.chunk(c).raw_size for c in t.chunks] for t in store.catalog.tensors(vid)}
    assert max(sizes["a"]) > layout.CHUNK_BYTES >= max(sizes["c"])
    assert all(n <= layout.ALIGNED_CHUNK_BYTES and n % 4096 == 0 for n in sizes["a"][:-1])
    assert_identical(store.get("m"), {"a": w, "c": w + 1})


def test_aligned_tensors_are_cut_in_page_multiples_and_never_stored_as_deltas(store, monkeypatch):
    monkeypatch.setattr(layout, "ALIGNED_CHUNK_BYTES", 1 << 20)
    parent = state()
    v1 = store.put(parent, "m", codecs={"*": "aligned"})
    child = {**parent, "emb": parent["emb"] + 1e-6}  # a delta would be far smaller: it must not be used
    v2 = store.put(child, "m", codecs={"*": "aligned"})
    for vid in (v1, v2):
        for record in store.catalog.tensors(vid):
            rows = [store.catalog.chunk(c) for c in record.chunks]
            assert all(r.codec.name == "aligned" and r.raw_size == r.stored_size and r.base is None for r in rows)
            assert [r.codec.params() for r in rows] == [aligned_params(chunk_bytes(store, c)) for c in record.chunks]
            assert all(r.raw_size % 4096 == 0 for r in rows[:-1])
    emb = [store.catalog.chunk(c).raw_size for c in store.catalog.tensors(v2)[0].chunks]
    assert len(emb) == 5 and emb[:4] == [1536 * 680] * 4  # 680 rows: a page multiple just under 1 MiB
    assert_identical(store.get("m", v2), child)


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("codecs", [None, {"*": "aligned"}, {"emb": "aligned", "odd": "fans" if NATIVE_AVAILABLE else
                                                             "planes", "ids": "zstd", "*": "raw"}],
                         ids=["automatic", "aligned", "mixed"])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_fast_loader_equals_the_general_path(store, small_chunks, codecs, threads):
    small_chunks(16384)
    want = state(200)
    vid = store.put(want, "m", codecs=codecs)
    got = store.get("m", threads=threads)
    assert list(got) == list(want)  # the records' order, whatever the arena's
    assert_identical(got, want)
    assert_identical(general_path(store, vid), want)
    assert all(t.data_ptr() % layout.ALIGN == 0 for t in got.values() if t.numel())
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1


@LINUX
def test_aligned_tensors_are_mapped_copy_on_write(store):
    want = state()
    vid = store.put(want, "m", codecs={"*": "aligned"})
    got = store.get("m")
    files = {c for t in store.catalog.tensors(vid) if t.name in ("emb", "half", "ids") for c in t.chunks}
    assert files <= mapped_chunk_files()
    assert all(got[n].data_ptr() % arena.PAGE == 0 for n in ("emb", "half", "ids"))
    before = {c: chunk_path(store.root, c).read_bytes() for c in files}
    got["emb"].add_(1.0)  # writes stay in this process's copy
    assert {c: chunk_path(store.root, c).read_bytes() for c in files} == before
    assert_identical(store.get("m"), want)
    assert torch.equal(got["emb"], want["emb"] + 1.0)
    del got
    assert not files & mapped_chunk_files()  # freeing the tensors unmaps the files


@LINUX
def test_mapped_tensors_outlive_gc_of_their_version(store):
    want = {"w": torch.randn(2048, 256)}
    store.put(want, "m", codecs={"*": "aligned"})
    got = store.get("m")
    store.catalog.db.execute("DELETE FROM tensors")
    store.catalog.db.execute("DELETE FROM versions")
    store.catalog.db.execute("DELETE FROM refs")
    assert store.gc(grace=0).chunks_removed > 0
    assert_identical(got, want)


def test_aligned_layout_loads_by_copying_where_it_cannot_map(store, monkeypatch):
    want = state()
    store.put(want, "m", codecs={"*": "aligned"})
    monkeypatch.setattr(loader, "can_map", lambda: False)
    got = store.get("m")
    assert_identical(got, want)
    if sys.platform.startswith("linux"):
        assert not mapped_chunk_files()


@LINUX
def test_a_failed_mapping_falls_back_to_a_copy(store, monkeypatch):
    want = state()
    store.put(want, "m", codecs={"*": "aligned"})

    def refuse(*args):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(arena.Arena, "map_file", refuse)
    assert_identical(store.get("m"), want)
    assert not mapped_chunk_files()


def test_arena_holds_copied_tensors_first_then_page_aligned_mapped_ones(monkeypatch):
    monkeypatch.setattr(loader, "can_map", lambda: True)
    records = [TensorRecord("a", "float32", (100,), ("a0",)), TensorRecord("b", "float32", (2048,), ("b0", "b1")),
               TensorRecord("c", "float32", (3,), ("c0",)), TensorRecord("d", "float32", (1024, 2), ("d0", "d1"))]
    aligned = Aligned(4096, "0" * 32)
    rows = {"a0": ChunkRow("a0", aligned, 400, 400), "b0": ChunkRow("b0", aligned, 4096, 4096),
            "b1": ChunkRow("b1", aligned, 4096, 4096), "c0": ChunkRow("c0", Fans(4), 12, 20),
            "d0": ChunkRow("d0", aligned, 4000, 4000), "d1": ChunkRow("d1", aligned, 4192, 4192)}
    plan = loader.plan(records, rows)
    assert [(r.name, off, n) for r, off, n in plan.tensors] == [("a", 12288, 400), ("b", 16384, 8192), ("c", 0, 12),
                                                                 ("d", 64, 8192)]  # d's first chunk is no page multiple
    assert plan.written == 64 + 8192 and plan.size == 16384 + 8192
    assert {j.row.id: (j.offset, j.mapped) for j in plan.jobs} == {
        "c0": (0, False), "d0": (64, False), "d1": (4064, False), "a0": (12288, True), "b0": (16384, True),
        "b1": (20480, True)}


# ---------------------------------------------------------------- hostile aligned chunks

@pytest.fixture
def aligned_store(tmp_path):
    root = tmp_path / "store"
    with Store.init(root) as s:
        vid = s.put({"w": torch.randn(2048, 8), "v": torch.randn(16)}, "m", codecs={"*": "aligned"})
        chunks = {t.name: t.chunks for t in s.catalog.tensors(vid)}
    return root, chunks


def _pad_start(data: bytes) -> int:
    return 12 + struct.unpack_from("<I", data, 8)[0]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 4]) + data[at + 1:]


def _with_header(params_changes: dict | None = None, **changes):
    """The file with its header rewritten (canonical JSON) and the payload kept on its page."""
    def fn(data: bytes) -> bytes:
        fields = {**json.loads(data[12:_pad_start(data)]), **changes}
        if params_changes:
            fields["params"] = {**fields["params"], **params_changes}
        body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        head = data[:8] + struct.pack("<I", len(body)) + body
        return head + bytes(4096 - len(head)) + data[4096:]
    return fn


HOSTILE = {
    "truncated in the padding": lambda d: d[:_pad_start(d) + 10],
    "truncated in the payload": lambda d: d[:-100],
    "truncated to the padding": lambda d: d[:4096],
    "one page appended": lambda d: d + bytes(4096),
    "one byte appended": lambda d: d + b"\x00",
    "padding not zero": lambda d: d[:_pad_start(d) + 3] + b"\x01" + d[_pad_start(d) + 4:],
    "padding removed": lambda d: d[:_pad_start(d)] + d[4096:],
    "payload bit flipped": lambda d: _flip(d, 4096 + (len(d) - 4096) // 2),
    "last payload bit flipped": lambda d: d[:-1] + bytes([d[-1] ^ 128]),
    "align changed in the header": _with_header({"align": 8192}),
    "align made invalid in the header": _with_header({"align": 4095}),
    "align 64 in the header": _with_header({"align": 64}),
    "check value changed in the header": _with_header({"xxh3_128": "0" * 32}),
    "check value removed from the header": _with_header(params={"align": 4096}),
    "codec changed to raw": _with_header(codec="raw", params={}),
    "raw_size changed": _with_header(raw_size=128),
    "empty file": lambda d: b"",
}


@pytest.mark.parametrize("tensor", ["w", "v"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_aligned_chunk_is_refused_not_crashed_on(aligned_store, case, tensor):
    root, chunks = aligned_store
    cid = chunks[tensor][0]
    path = chunk_path(root, cid)
    path.write_bytes(HOSTILE[case](path.read_bytes()))
    with Store(root) as s:
        with pytest.raises(CorruptChunkError, match=cid[:12]):
            s.get("m", names=[tensor])
        assert cid in s.verify().corrupt


@pytest.mark.parametrize("sql, value", [
    ("UPDATE chunks SET params=? WHERE id=?", '{"align": 3}'),
    ("UPDATE chunks SET params=? WHERE id=?", '{"align": 8192}'),
    ("UPDATE chunks SET stored_size=? WHERE id=?", 5),
    ("UPDATE chunks SET stored_size=? WHERE id=?", 1 << 40),
    ("UPDATE chunks SET raw_size=?, stored_size=raw_size WHERE id=?", 4096),
])
def test_a_tampered_aligned_catalogue_row_is_a_clear_error(aligned_store, sql, value):
    root, chunks = aligned_store
    cid = chunks["w"][0]
    with Store(root) as s:
        with s.catalog.transaction() as catalog:
            catalog.rows(sql, (value, cid))
        with pytest.raises(FormatError, match=r"chunk|tensor"):
            s.get("m")


def test_a_forgery_that_rewrites_the_fast_check_everywhere_is_caught_by_verify(aligned_store):
    """The mapped load trusts XXH3-128 (codecs.Aligned): a forger who changes the bytes and rewrites
    that value in both the file header and the catalogue gets past a load, never past `verify` (BLAKE3)."""
    root, chunks = aligned_store
    cid = chunks["w"][0]
    path = chunk_path(root, cid)
    data = path.read_bytes()
    forged = _flip(data, len(data) - 1)
    check = xxhash.xxh3_128(forged[4096:]).hexdigest()
    path.write_bytes(_with_header({"xxh3_128": check})(forged))
    with Store(root) as s:
        with s.catalog.transaction() as catalog:
            catalog.rows("UPDATE chunks SET params=? WHERE id=?", (json.dumps(params(4096, check)), cid))
        assert cid in s.verify().corrupt


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_in_place_of_a_chunk_file_is_refused_without_blocking(aligned_store):
    root, chunks = aligned_store
    path = chunk_path(root, chunks["v"][0])
    path.unlink()
    os.mkfifo(path)
    with Store(root) as s:
        with pytest.raises(FormatError, match="not a regular file"):
            s.get("m", names=["v"])


def test_codec_override_accepts_aligned_and_names_it_in_errors(store):
    with pytest.raises(StoreError, match="raw, aligned, zstd, planes, fans"):
        store.put({"w": torch.randn(4)}, "m", codecs={"*": "mapped"})


def test_an_aligned_put_adopts_chunks_already_stored_otherwise(store):
    """The first file for an id wins: a single-chunk tensor stored compressed first stays compressed."""
    w = torch.randn(64, 64)
    store.put({"w": w}, "a", codecs={"w": "zstd"})
    vid = store.put({"w": w}, "b", codecs={"w": "aligned"})
    (cid,) = store.catalog.tensors(vid)[0].chunks
    assert store.catalog.chunk(cid).codec.name == "zstd"
    assert_identical(store.get("b"), {"w": w})


# ---------------------------------------------------------------- catalogue

def test_bulk_chunk_rows_equal_single_rows_in_batches(store, small_chunks, monkeypatch):
    small_chunks(64)
    vid = store.put({"w": torch.randn(300, 16), "i": torch.arange(999)}, "m")
    ids = [c for t in store.catalog.tensors(vid) for c in t.chunks]
    monkeypatch.setattr("modelpress.store.catalog._BATCH", 7)
    assert store.catalog.chunks(ids + ids[:3]) == {c: store.catalog.chunk(c) for c in ids}
    with pytest.raises(FormatError, match="not in the catalogue"):
        store.catalog.chunks(ids + ["ab" * 32])


@pytest.mark.parametrize("codec, caught", [("raw", "does not match its hash"),  # same header: BLAKE3 tells
                                           ("aligned", "header disagrees")])  # the header's XXH3-128 differs
def test_chunk_hashes_are_checked_on_the_fast_path(store, codec, caught):
    """A chunk file swapped for a valid chunk of the same size and codec."""
    a, b = torch.randn(1024), torch.randn(1024)
    vid = store.put({"a": a, "b": b}, "m", codecs={"*": codec})
    ca, cb = (t.chunks[0] for t in store.catalog.tensors(vid))
    chunk_path(store.root, ca).write_bytes(chunk_path(store.root, cb).read_bytes())
    with pytest.raises(CorruptChunkError, match=f"chunk {ca[:12]}('s)? {caught}"):
        store.get("m")
    assert blake3.blake3(bits(b).numpy().tobytes()).hexdigest() == cb


# ---------------------------------------------------------------- compressed chunks decoded from a mapping

BIG_CODECS = ["planes", "zstd", pytest.param("fans", marks=pytest.mark.skipif(not NATIVE_AVAILABLE,
                                                                             reason="fans needs its C extension"))]


@pytest.fixture
def big_compressed(tmp_path):
    """A store whose tensor w is one compressed chunk file of well over 64 KiB (decoded from a mapping)."""
    def make(codec: str):
        root = tmp_path / "store"
        w = (torch.randn(256, 256) * 0.02).half().float()  # compressible by every codec, 256 KiB raw
        with Store.init(root) as s:
            vid = s.put({"w": w}, "m", codecs={"w": codec})
            (cid,) = s.catalog.tensors(vid)[0].chunks
            assert s.catalog.chunk(cid).codec.name == codec
        assert chunk_path(root, cid).stat().st_size >= reader._MAP_MIN
        return root, cid, w
    return make


@pytest.mark.parametrize("codec", BIG_CODECS)
def test_big_compressed_chunks_round_trip_through_a_mapping(big_compressed, codec):
    root, _, w = big_compressed(codec)
    with Store(root) as s:
        assert_identical(s.get("m"), {"w": w})


BIG_HOSTILE = {
    "truncated by one byte": lambda d: d[:-1],
    "truncated to half": lambda d: d[:len(d) // 2],
    "one byte appended": lambda d: d + b"\x00",
    "payload bit flipped": lambda d: _flip(d, len(d) // 2),
    "last bit flipped": lambda d: _flip(d, len(d) - 1),
    "header codec changed": lambda d: d.replace(b'"codec":"', b'"codec":"x', 1),
    "magic broken": lambda d: b"X" + d[1:],
}


@pytest.mark.parametrize("case", list(BIG_HOSTILE))
@pytest.mark.parametrize("codec", BIG_CODECS)
def test_hostile_big_compressed_chunks_are_refused(big_compressed, codec, case):
    root, cid, _ = big_compressed(codec)
    path = chunk_path(root, cid)
    path.write_bytes(BIG_HOSTILE[case](path.read_bytes()))
    with Store(root) as s:
        with pytest.raises(CorruptChunkError, match=cid[:12]):
            s.get("m")
