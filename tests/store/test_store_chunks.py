"""Chunk files: the byte layout in objects.py's docstring, built by hand; ids are BLAKE3 of the raw bytes;
headers read defensively."""

from __future__ import annotations

import json
import struct

import blake3
import pytest
import torch
import zstandard

from modelpress.codecs import Raw, Xor, Zstd
from modelpress.errors import FormatError
from modelpress.store import layout
from modelpress.store.backend import LocalFolder
from modelpress.store.objects import MAGIC, MAX_HEADER, ChunkHeader, chunk_id, chunk_key, chunk_path


def golden(header: dict, payload: bytes) -> bytes:
    """The documented layout: magic, uint32 LE header length, compact sorted-key JSON header, payload."""
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"MPCHUNK\x01" + struct.pack("<I", len(body)) + body + payload


@pytest.fixture
def root(tmp_path):
    """A bare store folder (its tmp/ is where files are written before they are linked into place)."""
    (tmp_path / "tmp").mkdir()
    return tmp_path


def write_chunk(root, cid: str, header: ChunkHeader, payload: bytes) -> bool:
    return LocalFolder(root).put_if_absent(chunk_key(cid), [header.head(), payload])


def read_chunk(root, cid: str) -> tuple[ChunkHeader, bytes]:
    data = chunk_path(root, cid).read_bytes()
    header, offset = ChunkHeader.parse(data, f"chunk {cid[:12]}")
    return header, data[offset:]


def test_magic_and_header_cap_are_the_documented_ones():
    assert MAGIC == b"MPCHUNK\x01" and len(MAGIC) == 8
    assert MAX_HEADER == 4096


def test_raw_chunk_file_matches_hand_built_bytes(root):
    raw = bytes([0, 1, 2, 3, 250])
    cid = chunk_id(raw)
    header = ChunkHeader(Raw(), len(raw))
    assert write_chunk(root, cid, header, raw)
    expected = (b'MPCHUNK\x01' + b'\x34\x00\x00\x00'
                + b'{"base":null,"codec":"raw","params":{},"raw_size":5}' + raw)
    path = root / "chunks" / cid[:2] / cid
    assert path.read_bytes() == expected == golden({"base": None, "codec": "raw", "params": {}, "raw_size": 5}, raw)


def test_delta_chunk_header_names_its_base(root):
    base = "ab" * 32
    payload = b"\x00" * 9
    cid = chunk_id(b"delta")
    write_chunk(root, cid, ChunkHeader(Xor(4), 8, base), payload)
    want = golden({"base": base, "codec": "xor", "params": {"width": 4}, "raw_size": 8}, payload)
    assert chunk_path(root, cid).read_bytes() == want


def test_chunk_id_is_blake3_of_the_raw_bytes():
    raw = b"the raw bytes of a row block"
    assert chunk_id(raw) == blake3.blake3(raw).hexdigest()
    assert chunk_id(memoryview(raw)) == chunk_id(raw)
    assert len(chunk_id(b"")) == 64


def test_chunk_path_is_two_level_fan_out(tmp_path):
    cid = chunk_id(b"x")
    assert chunk_path(tmp_path, cid) == tmp_path / "chunks" / cid[:2] / cid


def test_an_existing_chunk_file_wins(root):
    """A second writer of the same content (another codec) leaves the first file as it is (the store then checks
    that file before adopting it: see tests/hostile/test_store_strays.py)."""
    raw = b"same bytes" * 10
    cid = chunk_id(raw)
    assert write_chunk(root, cid, ChunkHeader(Raw(), len(raw)), raw)
    before = chunk_path(root, cid).read_bytes()
    payload = zstandard.ZstdCompressor().compress(raw)
    assert not write_chunk(root, cid, ChunkHeader(Zstd(), len(raw)), payload)
    assert chunk_path(root, cid).read_bytes() == before
    assert list((root / "tmp").iterdir()) == []


def test_read_chunk_returns_header_and_payload(root):
    payload = zstandard.ZstdCompressor().compress(b"q" * 100)
    cid = chunk_id(b"q" * 100)
    write_chunk(root, cid, ChunkHeader(Zstd(), 100), payload)
    header, got = read_chunk(root, cid)
    assert header == ChunkHeader(Zstd(), 100, None)
    assert bytes(got) == payload


def test_store_writes_the_documented_bytes_for_a_scalar(store):
    """A 0-D fp32 tensor is one raw chunk (nothing compresses 4 bytes): its file is fully predictable."""
    t = torch.tensor(1.5)
    vid = store.put({"scale": t}, "m")
    (record,) = store.catalog.tensors(vid)
    raw = t.numpy().tobytes()
    assert record.chunks == (blake3.blake3(raw).hexdigest(),)
    path = store.root / "chunks" / record.chunks[0][:2] / record.chunks[0]
    assert path.read_bytes() == golden({"base": None, "codec": "raw", "params": {}, "raw_size": 4}, raw)


def test_store_chunk_ids_are_blake3_of_each_row_block(store, small_chunks):
    small_chunks(1024)
    t = torch.randn(40, 16)  # 64-byte rows, 16 rows per chunk -> 3 chunks (16, 16, 8 rows)
    vid = store.put({"w": t}, "m")
    (record,) = store.catalog.tensors(vid)
    raw = t.numpy().tobytes()
    assert record.chunks == tuple(blake3.blake3(raw[i:i + 1024]).hexdigest() for i in range(0, len(raw), 1024))
    for cid in record.chunks:
        header, _ = read_chunk(store.root, cid)
        data = chunk_path(store.root, cid).read_bytes()
        assert data[:8] == MAGIC
        (length,) = struct.unpack_from("<I", data, 8)
        assert json.loads(data[12:12 + length]) == {"base": None, "codec": header.codec.name,
                                                    "params": header.codec.params(), "raw_size": header.raw_size}


@pytest.mark.parametrize("nbytes, shape, itemsize, target, spans", [
    (0, (0, 4), 4, 64, []),
    (4, (), 4, 64, [(0, 4)]),
    (40, (10,), 4, 16, [(0, 16), (16, 16), (32, 8)]),
    (96, (4, 6), 4, 50, [(0, 48), (48, 48)]),  # whole 24-byte rows: 2 per chunk
    (96, (4, 6), 4, 10, [(0, 24), (24, 24), (48, 24), (72, 24)]),  # a row larger than the target: one per chunk
    (2 * 3 * 4 * 5 * 2, (2, 3, 4, 5), 2, 60, [(0, 120), (120, 120)]),
    (2 * (5 << 20), (2, 5 << 20), 1, 4 << 20, [(0, 4 << 20), (4 << 20, 4 << 20), (8 << 20, 2 << 20)]),  # rows over
    # MAX_STEP (4 MiB) are cut between elements: no chunk grows with a row
])
def test_split_rows_cuts_between_whole_rows(nbytes, shape, itemsize, target, spans):
    assert layout.split_rows(nbytes, shape, itemsize, target) == spans


# ---------------------------------------------------------------- headers read defensively

def _file(body: bytes, length: int | None = None, payload: bytes = b"") -> memoryview:
    return memoryview(MAGIC + struct.pack("<I", len(body) if length is None else length) + body + payload)


GOOD = {"base": None, "codec": "raw", "params": {}, "raw_size": 4}
BAD_HEADERS = {
    "empty file": memoryview(b""),
    "bad magic": memoryview(b"MPCHUNK\x02" + _file(json.dumps(GOOD).encode())[8:].tobytes()),
    "magic only": memoryview(MAGIC),
    "header length past the end": _file(json.dumps(GOOD).encode(), length=500),
    "header length over the cap": _file(json.dumps(GOOD).encode() + b" " * 4100, length=MAX_HEADER + 1),
    "header length 2**32-1": _file(b"{}", length=0xFFFFFFFF),
    "not UTF-8": _file(b"\xff\xfe{}"),
    "not JSON": _file(b"{codec: raw}"),
    "JSON list": _file(b"[1, 2]"),
    "codec not a string": _file(json.dumps({**GOOD, "codec": 3}).encode()),
    "params not an object": _file(json.dumps({**GOOD, "params": [4]}).encode()),
    "raw_size negative": _file(json.dumps({**GOOD, "raw_size": -1}).encode()),
    "raw_size over 1 TiB": _file(json.dumps({**GOOD, "raw_size": (1 << 40) + 1}).encode()),
    "raw_size a float": _file(json.dumps({**GOOD, "raw_size": 4.0}).encode()),
    "raw_size missing": _file(json.dumps({"base": None, "codec": "raw", "params": {}}).encode()),
    "base a path": _file(json.dumps({**GOOD, "base": "../../etc/passwd"}).encode()),
    "base upper-case hex": _file(json.dumps({**GOOD, "base": "AB" * 32}).encode()),
    "base a number": _file(json.dumps({**GOOD, "base": 7}).encode()),
}
NESTED = pytest.param(_file(b"[" * 4000), id="deeply nested JSON")


@pytest.mark.parametrize("data", [pytest.param(v, id=k) for k, v in BAD_HEADERS.items()] + [NESTED])
def test_hostile_header_is_a_format_error(data):
    with pytest.raises(FormatError, match="chunk c0ffee"):
        ChunkHeader.parse(data, "chunk c0ffee")


def test_good_header_parses_and_points_at_the_payload():
    body = json.dumps(GOOD, sort_keys=True, separators=(",", ":")).encode()  # the only valid spelling
    header, offset = ChunkHeader.parse(_file(body, payload=b"abcd"), "x")
    assert header == ChunkHeader(Raw(), 4, None)
    assert offset == 12 + len(body)


def test_a_header_in_non_canonical_form_is_refused():
    with pytest.raises(FormatError, match="canonical"):
        ChunkHeader.parse(_file(json.dumps(GOOD).encode(), payload=b"abcd"), "x")


@pytest.mark.parametrize("cid", ["../../etc/passwd", "ab/" + "c" * 61, "A" * 64, "a" * 63, "a" * 65, "", "g" * 64,
                                 "/" + "a" * 63])
def test_chunk_keys_refuse_ids_that_are_not_64_hex_digits(tmp_path, cid):
    with pytest.raises(FormatError, match="invalid chunk id"):
        chunk_path(tmp_path, cid)
    with pytest.raises(FormatError, match="invalid chunk id"):
        chunk_key(cid)
    assert not (tmp_path / "chunks").exists() and not (tmp_path / "tmp").exists()
