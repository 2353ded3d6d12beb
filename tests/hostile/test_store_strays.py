"""Stray chunk files (left by a killed writer, damaged since, or planted) are never adopted without their hash
being checked: a put that finds a file at the path of a chunk it is adding reads it back first; a damaged
one (truncated, empty, garbage, a valid header over wrong bytes, a delta on a base the store does not have,
a FIFO, a link) is replaced by the put's own chunk, a sound one (another codec's) is adopted as it is. The new
version reads back byte-identical and every older one still does; the store verifies clean."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from _store_hostile import Victim, assert_identical, bits, victim  # noqa: F401  (victim: the fixture)
from modelpress.codecs import Planes, Raw, Xor, Zstd, choose
from modelpress.store import Store
from modelpress.store.objects import ChunkHeader, chunk_id

NEW = {"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(11))}  # one chunk (8 KiB)


def _chunk(victim: Victim):
    raw = bits(NEW["w"]).numpy().tobytes()
    cid = chunk_id(raw)
    path = victim.root / "chunks" / cid[:2] / cid
    path.parent.mkdir(exist_ok=True)
    return cid, raw, path


def _header_over(raw: bytes, payload: bytes, codec=None, base=None, raw_size=None) -> bytes:
    return ChunkHeader(codec or Raw(), len(raw) if raw_size is None else raw_size, base).head() + payload


STRAYS = {
    "empty": lambda raw: b"",
    "truncated raw chunk": lambda raw: _header_over(raw, raw)[:len(raw) // 2],
    "garbage": lambda raw: os.urandom(len(raw)),
    "valid header over other bytes": lambda raw: _header_over(raw, bytes(len(raw))),
    "valid header over one flipped bit": lambda raw: _header_over(raw, raw[:-1] + bytes([raw[-1] ^ 1])),
    "header of another size": lambda raw: _header_over(raw, raw[:100], raw_size=100),
    "xor delta on a base the store lacks": lambda raw: _header_over(
        raw, Xor(4).encode(memoryview(raw), memoryview(bytes(len(raw)))), Xor(4), "ab" * 32),
    "non-canonical header": lambda raw: b"MPCHUNK\x01" + struct.pack("<I", len(h := json.dumps(
        {"base": None, "codec": "raw", "params": {}, "raw_size": len(raw)}).encode())) + h + raw,
}


@pytest.mark.parametrize("case", list(STRAYS) + ["fifo", "link to /dev/zero"])
def test_a_damaged_stray_is_replaced_not_adopted(victim, case):
    cid, raw, path = _chunk(victim)
    if case == "fifo":
        os.mkfifo(path)
    elif case == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(STRAYS[case](raw))
    with Store(victim.root) as s:
        vid = s.put(NEW, "new")
        assert_identical(s.get("new", vid), NEW)
        assert s.catalog.chunk(cid).codec == choose(memoryview(raw), 4, floating=True)  # ours, as the put chose it
    assert path.is_file() and not path.is_symlink()
    victim.intact()


@pytest.mark.parametrize("codec", [Raw(), Zstd(), Planes(4)], ids=repr)
def test_a_sound_stray_is_adopted_as_it_is(victim, codec):
    """Another codec than the put would choose: the file stays, and its row says what it holds."""
    cid, raw, path = _chunk(victim)
    data = _header_over(raw, codec.encode(memoryview(raw)), codec)
    path.write_bytes(data)
    with Store(victim.root) as s:
        vid = s.put(NEW, "new")
        assert s.catalog.chunk(cid).codec == codec
        assert_identical(s.get("new", vid), NEW)
    assert path.read_bytes() == data
    victim.intact()


def test_a_sound_delta_stray_on_a_stored_base_is_adopted(victim):
    """A killed writer's delta whose base is a committed chunk: checked by decoding it on that base."""
    with Store(victim.root) as s:
        base_row = s.catalog.chunk(victim.chunks["base"])
        base = bytes(s.reader.read(base_row))
    raw = (torch.frombuffer(bytearray(base), dtype=torch.float32) + 1e-3).numpy().tobytes()
    cid = chunk_id(raw)
    path = victim.root / "chunks" / cid[:2] / cid
    path.parent.mkdir(exist_ok=True)
    data = _header_over(raw, Xor(4).encode(memoryview(raw), memoryview(base)), Xor(4), base_row.id)
    path.write_bytes(data)
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(64, 32)
    with Store(victim.root) as s:
        vid = s.put({"encoder.weight": tensor}, "delta", parent=None)
        assert s.catalog.chunk(cid).base == base_row.id
        assert_identical(s.get("delta", vid), {"encoder.weight": tensor})
    assert path.read_bytes() == data
    victim.intact()
