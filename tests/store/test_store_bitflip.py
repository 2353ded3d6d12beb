"""A flipped bit in a chunk file: verify() reports that chunk, and get() refuses its tensor, naming the chunk."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from _store_support import assert_identical
from modelpress.codecs import NATIVE_AVAILABLE
from modelpress.store import CorruptChunkError, Store
from modelpress.store.objects import chunk_path


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store whose chunks use each codec: v1 holds a planes, a zstd, a raw (and a fans) chunk; v2 (latest)
    changes the planes tensor slightly, so its chunk is an xor delta on v1's. Returns the store's root,
    {codec: (version, tensor, chunk id)} and each version's state."""
    root = tmp_path_factory.mktemp("bitflip") / "store"
    torch.manual_seed(0)
    v1_state = {"w": torch.randn(16, 8), "ints": torch.arange(64, dtype=torch.int32) // 8, "scale": torch.randn(3)}
    codecs = {"w": "planes", "ints": "zstd", "scale": "raw"}
    if NATIVE_AVAILABLE:
        v1_state["f"], codecs["f"] = torch.randn(16, 8), "fans"
    v2_state = {**v1_state, "w": v1_state["w"] + 1e-4 * torch.randn(16, 8)}
    with Store.init(root) as store:
        v1 = store.put(v1_state, "m", codecs=codecs)
        v2 = store.put(v2_state, "m", codecs=codecs, message="fine-tune")
        by_codec = {}
        for vid in (v1, v2):
            for t in store.catalog.tensors(vid):
                by_codec.setdefault(store.catalog.chunk(t.chunks[0]).codec.name, (vid, t.name, t.chunks[0]))
        assert set(by_codec) == {"planes", "zstd", "raw", "xor"} | ({"fans"} if NATIVE_AVAILABLE else set())
        assert by_codec["xor"][0] == v2 and store.catalog.chunk(by_codec["xor"][2]).base == by_codec["planes"][2]
    return root, by_codec, {v1: v1_state, v2: v2_state}


@pytest.fixture
def stocked(template, tmp_path):
    """A private copy of the template store, open: (store, by_codec, states)."""
    root, by_codec, states = template
    shutil.copytree(root, tmp_path / "store")
    with Store(tmp_path / "store") as store:
        yield store, by_codec, states


def _header_length(data: bytes) -> int:
    return struct.unpack_from("<I", data, 8)[0]


def _offset(data: bytes, where: str) -> int:
    """A byte offset in a chunk file, by the region of the documented layout it falls in."""
    h = _header_length(data)
    header = data[12:12 + h].decode()
    return {
        "magic": 0,
        "magic-version": 7,
        "header-length": 8,
        "header-length-high": 11,
        "header-brace": 12,
        "codec-name": 12 + header.index('"codec":"') + len('"codec":"'),
        "raw-size-digit": 12 + header.index('"raw_size":') + len('"raw_size":'),
        "header-end": 12 + h - 1,
        "payload-first": 12 + h,
        "payload-middle": 12 + h + (len(data) - 12 - h) // 2,
        "payload-last": len(data) - 1,
    }[where]


REGIONS = ["magic", "magic-version", "header-length", "header-length-high", "header-brace", "codec-name",
           "raw-size-digit", "header-end", "payload-first", "payload-middle", "payload-last"]


def _flip(path, offset: int, bit: int) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return original


@pytest.mark.parametrize("bit", [0, 7])
@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("codec", ["planes", "zstd", "raw", "xor", pytest.param("fans", marks=pytest.mark.skipif(
    not NATIVE_AVAILABLE, reason="the fans codec's C extension is not built"))])
def test_flipped_bit_is_reported_by_verify_and_refused_by_get(stocked, codec, region, bit):
    store, by_codec, states = stocked
    vid, name, cid = by_codec[codec]
    path = chunk_path(store.root, cid)
    original = _flip(path, _offset(path.read_bytes(), region), bit)

    report = store.verify()
    resting_on_it = {by_codec["xor"][2]} if codec == "planes" else set()  # a delta is unreadable without its base
    assert set(report.corrupt) == {cid} | resting_on_it and report.missing == ()
    with pytest.raises(CorruptChunkError, match=cid[:12]):
        store.get("m", vid, names=[name])
    others = {n: t for n, t in states[vid].items() if n != name}
    assert_identical(store.get("m", vid, names=list(others)), others)

    path.write_bytes(original)
    assert store.verify().ok


def test_flipped_bit_in_a_delta_base_refuses_the_child_too(stocked):
    store, by_codec, _ = stocked
    _, name, base = by_codec["planes"]
    path = chunk_path(store.root, base)
    _flip(path, len(path.read_bytes()) - 1, 3)
    with pytest.raises(CorruptChunkError, match=base[:12]):
        store.get("m", by_codec["xor"][0], names=[name])  # the child's xor chunk needs its base


def test_flipped_bit_makes_open_refuse_only_that_tensor(stocked):
    store, by_codec, states = stocked
    vid, name, cid = by_codec["zstd"]
    path = chunk_path(store.root, cid)
    _flip(path, len(path.read_bytes()) - 2, 1)
    with store.open("m", vid) as lazy:
        assert torch.equal(lazy["scale"], states[vid]["scale"])
        with pytest.raises(CorruptChunkError, match=cid[:12]):
            lazy[name]



@pytest.mark.parametrize("codec", ["planes", "zstd", "raw"])
def test_flipped_bit_in_the_base_key_is_reported(stocked, codec):
    store, by_codec, _ = stocked
    _, _, cid = by_codec[codec]
    path = chunk_path(store.root, cid)
    data = path.read_bytes()
    assert json.loads(data[12:12 + _header_length(data)])["base"] is None
    _flip(path, 12 + data[12:].index(b'"base"') + 1, 0)  # "base" -> "case"
    corrupt = store.verify().corrupt
    assert cid in corrupt  # (deltas built on this chunk are reported too: they cannot decode without it)



def test_flipped_unused_zstd_frame_bit_is_reported(stocked):
    store, by_codec, _ = stocked
    _, _, cid = by_codec["zstd"]
    path = chunk_path(store.root, cid)
    data = path.read_bytes()
    _flip(path, 12 + _header_length(data) + 4, 4)  # payload: 4-byte zstd magic, then the frame header descriptor
    assert store.verify().corrupt == (cid,)



def test_flipped_zstd_size_flag_is_reported(stocked):
    store, by_codec, _ = stocked
    vid, name, cid = by_codec["zstd"]
    path = chunk_path(store.root, cid)
    _flip(path, 12 + _header_length(path.read_bytes()) + 4, 7)
    with pytest.raises(CorruptChunkError, match=cid[:12]):
        store.get("m", vid, names=[name])
    assert store.verify().corrupt == (cid,)



def test_every_single_bit_flip_of_a_raw_chunk_is_reported(tmp_path):
    with Store.init(tmp_path / "s") as s:
        vid = s.put({"r": torch.randn(3)}, "m")
        (cid,) = s.catalog.tensors(vid)[0].chunks
        path = chunk_path(s.root, cid)
        original = path.read_bytes()
        missed = []
        for bit in range(8 * len(original)):
            _flip(path, bit // 8, bit % 8)
            if s.verify().corrupt != (cid,):
                missed.append((bit // 8, bit % 8))
            path.write_bytes(original)
        assert missed == []
