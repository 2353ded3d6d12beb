"""Integrity covers everything a load uses: each version's id is its root hash over its tensors' names, dtypes,
shapes and chunk lists, its support files, manifest and parent (store/rows.py), recomputed on every get, load
and open and by verify. Tampering with any of it in the catalogue is an IntegrityError, not swapped weights;
verify names the version; gc refuses to remove anything. Codecs are outside the root hash on purpose: each
chunk is checked against its id, so a tampered codec is a corrupt chunk. Every other version still reads
back and verifies."""

from __future__ import annotations

import json

import blake3
import pytest

from _store_hostile import Victim, victim  # noqa: F401  (victim: the fixture)
from modelpress.errors import CorruptChunkError, IntegrityError, StoreError
from modelpress.store import Store
from modelpress.store.rows import TensorRecord, version_id


def _enc_rows(victim: Victim) -> dict:
    with Store(victim.root) as s:
        return {t.name: t for t in s.catalog.tensors(victim.vid("enc"))}


def _swap_chunk_lists(victim: Victim) -> None:
    """Two tensors of the same dtype and shape (a layer's query and key weights) trade chunk lists."""
    rows = _enc_rows(victim)
    q, k = (next(n for n in rows if n.endswith(f"attention.self.{w}.weight")) for w in ("query", "key"))
    assert rows[q].shape == rows[k].shape and rows[q].chunks != rows[k].chunks
    vid = victim.vid("enc")
    victim.tamper("UPDATE tensors SET chunks=? WHERE version=? AND name=?", json.dumps(list(rows[k].chunks)), vid, q)
    victim.tamper("UPDATE tensors SET chunks=? WHERE version=? AND name=?", json.dumps(list(rows[q].chunks)), vid, k)


def _a_float32_tensor(victim: Victim) -> str:
    return next(n for n, t in _enc_rows(victim).items() if t.dtype == "float32" and len(t.shape) == 2)


TAMPERING = {
    "two tensors' chunk lists swapped": _swap_chunk_lists,
    "a dtype changed to one of the same size": lambda v: v.tamper(
        "UPDATE tensors SET dtype='int32' WHERE version=? AND name=?", v.vid("enc"), _a_float32_tensor(v)),
    "a shape transposed": lambda v: v.tamper(
        "UPDATE tensors SET shape=(SELECT json_array(json_extract(shape, '$[1]'), json_extract(shape, '$[0]'))) "
        "WHERE version=? AND name=?", v.vid("enc"), _a_float32_tensor(v)),
    "a tensor renamed": lambda v: v.tamper(
        "UPDATE tensors SET name='renamed' WHERE version=? AND name=?", v.vid("enc"), _a_float32_tensor(v)),
    "a tensor row deleted": lambda v: v.tamper(
        "DELETE FROM tensors WHERE version=? AND name=?", v.vid("enc"), _a_float32_tensor(v)),
    "tokenizer.json pointed at another chunk": lambda v: v.tamper(
        "UPDATE files SET chunk=? WHERE version=? AND path='tokenizer.json'", v.chunks["config"], v.vid("enc")),
    "a support file row deleted": lambda v: v.tamper(
        "DELETE FROM files WHERE version=? AND path='vocab.txt'", v.vid("enc")),
    "the manifest edited": lambda v: v.tamper(
        "UPDATE versions SET manifest=json_set(manifest, '$.architecture.kind', 'module') WHERE id=?", v.vid("enc")),
    "the parent changed": lambda v: v.tamper("UPDATE versions SET parent=? WHERE id=?", v.vid("a"), v.vid("enc")),
    "the model renamed": lambda v: (v.tamper("UPDATE versions SET model='m' WHERE id=?", v.vid("enc")),
                                    v.tamper("UPDATE refs SET model='m', name='enc' WHERE version=?", v.vid("enc"))),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_version_rows_fail_the_root_hash_everywhere(victim, case):
    TAMPERING[case](victim)
    vid = victim.vid("enc")
    with Store(victim.root) as s:
        model = s.catalog.info(vid).model
        for read in (lambda: s.load(model, vid), lambda: s.get(model, vid), lambda: s.manifest(model, vid),
                     lambda: s.open(model, vid).__enter__(), lambda: s.stored_bytes(model, vid)):
            with pytest.raises(IntegrityError, match=f"version {vid[:12]}.*do not hash to its id"):
                read()
        report = s.verify()
        assert report.versions == (vid,) and not report.corrupt and not report.missing and not report.catalogue
        assert any(line.startswith(f"version {vid}") for line in report.problems)
        with pytest.raises(StoreError, match="gc removed nothing"):
            s.gc(grace=0)
    victim.intact(attacked=(vid,), skip=("enc",))


def test_a_tampered_codec_is_caught_by_the_chunk_it_describes(victim):
    """Codecs are not in the root hash: the chunk's file header must agree with its row, and its bytes with its
    id, so the version is refused all the same (as a corrupt chunk, which verify names)."""
    cid = victim.chunks["table"]
    victim.tamper("UPDATE chunks SET codec='raw', params='{}' WHERE id=?", cid)
    with Store(victim.root) as s:
        with pytest.raises(CorruptChunkError, match=cid[:12]):
            s.get("m", names=["shared.table"])
        assert s.verify().corrupt == (cid,)
    victim.intact(attacked=(cid,), skip=("m",))


def test_the_root_hash_is_the_version_id_stores_always_had():
    """Golden bytes: the canonical JSON of docs/STORE_FORMAT.md and its BLAKE3, as the store before the root hash
    was checked computed it (the value below came from that code), so versions in existing stores pass."""
    records = [TensorRecord("a.weight", "float32", (2, 3), ("ab" * 32, "cd" * 32)), TensorRecord("b", "int8", (), ("ef" * 32,))]
    manifest = {"format": "modelpress.checkpoint", "format_version": 1, "x": [1.5, None, "\u00e9"]}
    files = {"tokenizer.json": "01" * 32, "config.json": "23" * 32}
    body = ('{"files":{"config.json":"' + "23" * 32 + '","tokenizer.json":"' + "01" * 32 + '"},'
            '"manifest":{"format":"modelpress.checkpoint","format_version":1,"x":[1.5,null,"\\u00e9"]},"model":"m",'
            '"parent":"' + "45" * 32 + '","tensors":[["a.weight","float32",[2,3],["' + "ab" * 32 + '","' + "cd" * 32
            + '"]],["b","int8",[],["' + "ef" * 32 + '"]]]}')
    assert blake3.blake3(body.encode()).hexdigest() == version_id("m", "45" * 32, manifest, records, files)
    assert version_id("m", "45" * 32, manifest, records, files) == \
        "a74fa607b3b582b3ab93117b54dbc50557e9243c113f63306869b9e0d988fee7"
