"""Store round trips: every dtype and shape bit-identical, arena views, name patterns, lazy access, dedup,
exact deltas, versions and refs, gc, and compressed models that run with identical outputs."""

from __future__ import annotations

import copy
import sqlite3

import blake3
import pytest
import torch

import modelpress
from _store_support import assert_identical, bits, chunk_files
from modelpress.errors import FormatError
from modelpress.store import CorruptChunkError, Store, StoreError, VersionNotFoundError
from modelpress.store.layout import ALIGN, DTYPES
from modelpress.codecs import NATIVE_AVAILABLE, Raw, Xor
from modelpress.store.objects import ChunkHeader, chunk_id, chunk_key, chunk_path

SHAPES = [(), (0,), (1,), (5,), (3, 7), (2, 3, 4, 5), (0, 4), (4, 0, 2)]
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values over the dtype's whole range; floats include NaN, +-inf and -0.0."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
        flat = t.view(-1)
        for i, special in enumerate([float("nan"), float("inf"), float("-inf"), -0.0]):
            if i < flat.numel():
                flat[i] = special
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def tensor_chunks(store: Store, vid: str) -> dict[str, tuple[str, ...]]:
    return {t.name: t.chunks for t in store.catalog.tensors(vid)}


# ---------------------------------------------------------------- exact round trips

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_every_dtype_and_shape_round_trips_bit_identical(store, dtype):
    state = {f"t{'x'.join(map(str, shape)) or 'scalar'}": sample(dtype, shape, seed=i)
             for i, shape in enumerate(SHAPES)}
    store.put(state, "m")
    assert_identical(store.get("m"), state)


def test_nan_payloads_and_negative_zero_keep_their_bits(store):
    words = torch.tensor([0x7FC00001, 0xFFC00000 - (1 << 32), 0x80000000 - (1 << 32), 0x7F800001], dtype=torch.int64)
    t = words.to(torch.int32).view(torch.float32)
    store.put({"special": t}, "m")
    assert torch.equal(store.get("m")["special"].view(torch.int32), words.to(torch.int32))


def test_non_contiguous_input_is_stored_row_major(store):
    t = torch.randn(6, 9).t()  # (9, 6), a transposed view
    store.put({"t": t}, "m")
    assert_identical(store.get("m"), {"t": t.contiguous()})


def test_tensor_of_many_chunks_round_trips(store, small_chunks):
    small_chunks(1000)  # 64-byte rows -> 15 rows (960 bytes) per chunk
    t = torch.randn(100, 16)
    vid = store.put({"t": t, "v": torch.arange(1000, dtype=torch.int16)}, "m")
    chunks = tensor_chunks(store, vid)
    assert len(chunks["t"]) == 7 and len(chunks["v"]) == 2  # ceil(100 rows / 15), 2000 bytes / 1000
    assert_identical(store.get("m", threads=3), {"t": t, "v": torch.arange(1000, dtype=torch.int16)})


def test_megabyte_tensor_is_split_at_chunk_bytes(store):
    t = torch.randn(1536, 512)  # 3 MiB of fp32: three 1 MiB row blocks
    vid = store.put({"big": t}, "m")
    raw = t.numpy().tobytes()
    assert tensor_chunks(store, vid)["big"] == tuple(
        blake3.blake3(raw[i:i + (1 << 20)]).hexdigest() for i in range(0, len(raw), 1 << 20))
    assert_identical(store.get("m"), {"big": t})


def test_unsupported_dtype_is_refused(store):
    with pytest.raises(FormatError, match="complex64"):
        store.put({"c": torch.zeros(3, dtype=torch.complex64)}, "m")
    with pytest.raises(VersionNotFoundError):
        store.log("m")


@pytest.mark.parametrize("bad", [[1, 2], {"a": "not a tensor"}, {1: torch.zeros(1)}])
def test_put_refuses_what_is_not_a_model_or_state_dict(store, bad):
    with pytest.raises(StoreError, match="nn.Module or a dict"):
        store.put(bad, "m")


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "-flag", "x" * 201, "new\nline"])
def test_bad_model_names_are_refused(store, name):
    with pytest.raises(StoreError, match="invalid model name"):
        store.put({"a": torch.zeros(1)}, name)


# ---------------------------------------------------------------- arena, patterns, lazy

def test_get_returns_aligned_views_of_one_arena(store):
    state = {"a": torch.randn(3), "b": torch.arange(5, dtype=torch.int8), "c": torch.randn(7, 3).half(),
             "d": torch.tensor(True), "e": torch.zeros(0), "f": torch.randn(2, 2).double()}
    store.put(state, "m")
    got = store.get("m")
    storages = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(storages) == 1
    assert all(t.data_ptr() % ALIGN == 0 for t in got.values() if t.numel())
    arena = next(iter(got.values())).untyped_storage()
    assert arena.nbytes() == sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in state.values())
    assert_identical(got, state)


def test_get_by_name_pattern_returns_only_matching_tensors(store):
    state = {"enc.0.weight": torch.randn(4, 4), "enc.0.bias": torch.randn(4), "enc.1.weight": torch.randn(4, 4),
             "head.weight": torch.randn(2, 4)}
    store.put(state, "m")
    assert sorted(store.get("m", names=["enc.*.weight"])) == ["enc.0.weight", "enc.1.weight"]
    assert sorted(store.get("m", names=["*.bias", "head.*"])) == ["enc.0.bias", "head.weight"]
    assert_identical(store.get("m", names=["head.weight"]), {"head.weight": state["head.weight"]})
    with pytest.raises(VersionNotFoundError, match="no tensor"):
        store.get("m", names=["decoder.*"])


def _corrupt_payload(store: Store, cid: str) -> None:
    path = chunk_path(store.root, cid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_get_decodes_only_the_tensors_asked_for(store):
    state = {"good": torch.randn(8, 8), "bad": torch.randn(8, 8)}
    vid = store.put(state, "m")
    _corrupt_payload(store, tensor_chunks(store, vid)["bad"][0])
    assert_identical(store.get("m", names=["good"]), {"good": state["good"]})
    with pytest.raises(CorruptChunkError):
        store.get("m")


def test_open_decodes_lazily_on_access(store):
    state = {"good": torch.randn(8, 8), "bad": torch.randn(8, 8), "int": torch.arange(10)}
    vid = store.put(state, "m")
    _corrupt_payload(store, tensor_chunks(store, vid)["bad"][0])
    with store.open("m") as lazy:  # opening decodes nothing: the corrupt chunk does not stop it
        assert sorted(lazy.keys()) == ["bad", "good", "int"] and len(lazy) == 3
        assert "good" in lazy and "missing" not in lazy
        assert torch.equal(bits(lazy["good"]), bits(state["good"]))
        assert lazy["good"] is lazy["good"]  # decoded once
        assert torch.equal(lazy["int"], state["int"])
        with pytest.raises(CorruptChunkError):
            lazy["bad"]
        with pytest.raises(KeyError, match="no tensor named 'missing'"):
            lazy["missing"]


# ---------------------------------------------------------------- dedup and deltas

def test_identical_content_is_stored_once(store):
    w = torch.randn(32, 32)
    v1 = store.put({"a": w, "b": w.clone(), "c": torch.ones(10)}, "m")
    assert len(chunk_files(store.root)) == 2  # a and b share their chunk
    before = chunk_files(store.root)
    v2 = store.put({"a": w, "b": w.clone(), "c": torch.ones(10)}, "m", message="same content again")
    store.put({"x": w.clone(), "y": torch.ones(10)}, "other")  # another model, same tensors
    assert chunk_files(store.root) == before
    assert v1 != v2 and store.stored_bytes("m", v2, exclusive_of=v1) == 0
    assert_identical(store.get("other"), {"x": w, "y": torch.ones(10)})


def test_a_slightly_changed_child_is_stored_as_an_exact_xor_delta(store, tmp_path):
    torch.manual_seed(0)
    parent = {"w": torch.randn(128, 64), "b": torch.randn(64)}
    child = {"w": parent["w"] + 1e-4 * torch.randn(128, 64), "b": parent["b"]}
    v1 = store.put(parent, "m")
    v2 = store.put(child, "m", message="fine-tune")
    (w_chunk,) = tensor_chunks(store, v2)["w"]
    row = store.catalog.chunk(w_chunk)
    assert (row.codec, row.base) == (Xor(4), tensor_chunks(store, v1)["w"][0])
    with Store.init(tmp_path / "alone") as alone:  # not `store`: there the child's chunk would dedupe to the delta
        vid = alone.put(child, "m")
        assert alone.catalog.chunk(tensor_chunks(alone, vid)["w"][0]).codec.name in ("planes", "fans")
        assert store.stored_bytes("m", v2, exclusive_of=v1) < 0.8 * alone.stored_bytes("m", vid)
    assert_identical(store.get("m", v2), child)
    assert_identical(store.get("m", v1), parent)


def test_a_child_with_no_parent_gets_no_delta(store):
    parent = {"w": torch.randn(64, 64)}
    store.put(parent, "m")
    vid = store.put({"w": parent["w"] + 1e-4}, "m", parent=None)
    assert store.catalog.chunk(tensor_chunks(store, vid)["w"][0]).base is None
    assert store.log("m")[0].parent is None


def test_delta_chains_stay_short_and_exact(store):
    torch.manual_seed(1)
    w = torch.randn(64, 64)
    versions = []
    for step in range(8):
        w = w + 1e-5 * torch.randn(64, 64)
        versions.append((store.put({"w": w}, "m"), w.clone()))
    for vid, want in versions:
        assert_identical(store.get("m", vid), {"w": want})
    for vid, _ in versions:
        depth, base = 0, store.catalog.chunk(tensor_chunks(store, vid)["w"][0]).base
        while base is not None:
            depth, base = depth + 1, store.catalog.chunk(base).base
        assert depth <= 4


def test_rows_that_did_not_change_keep_their_chunks(store, small_chunks):
    small_chunks(1024)
    w = torch.randn(64, 16)  # 4 chunks of 16 rows
    v1 = store.put({"w": w}, "m")
    w2 = w.clone()
    w2[40] += 1.0  # only the third row block changes
    v2 = store.put({"w": w2}, "m")
    c1, c2 = tensor_chunks(store, v1)["w"], tensor_chunks(store, v2)["w"]
    assert [a == b for a, b in zip(c1, c2)] == [True, True, False, True]
    (row,) = store.diff("m", v1, v2)
    assert row["changed_chunks"] == 1 and row["max_abs"] == float((w2.double() - w.double()).abs().max())
    assert_identical(store.get("m", v2), {"w": w2})


@pytest.mark.parametrize("codec", ["raw", "zstd", "planes", pytest.param("fans", marks=pytest.mark.skipif(
    not NATIVE_AVAILABLE, reason="the fans codec's C extension is not built"))])
def test_codec_override_is_used_and_lossless(store, codec):
    state = {"w": torch.randn(16, 16), "i": torch.arange(64, dtype=torch.int32)}
    vid = store.put(state, "m", codecs={"w": codec, "i": codec if codec in ("raw", "zstd") else "zstd"})
    assert store.catalog.chunk(tensor_chunks(store, vid)["w"][0]).codec.name == codec
    assert_identical(store.get("m"), state)


def test_codec_override_refuses_xor(store):
    with pytest.raises(StoreError, match="not a storage codec"):
        store.put({"w": torch.randn(4)}, "m", codecs={"*": "xor"})


# ---------------------------------------------------------------- versions, refs, log, diff

def test_log_lists_versions_newest_first_with_parents_messages_and_tags(store):
    v1 = store.put({"a": torch.zeros(2)}, "m", message="first", tags=("v1",))
    v2 = store.put({"a": torch.ones(2)}, "m", message="second")
    v3 = store.put({"a": torch.full((2,), 2.0)}, "m", parent=v1, message="branch")
    log = store.log("m")
    assert [v.id for v in log] == [v3, v2, v1]
    assert [v.parent for v in log] == [v1, v1, None]
    assert [v.message for v in log] == ["branch", "second", "first"]
    assert log[0].tags == ("latest",) and log[2].tags == ("v1",)
    assert store.models() == [("m", 3)]


def test_tag_and_resolve_by_ref_full_id_and_unique_prefix(store):
    v1 = store.put({"a": torch.zeros(2)}, "m")
    v2 = store.put({"a": torch.ones(2)}, "m")
    assert store.tag("m", v1[:8], "release") == v1
    assert store.resolve("m", "release") == v1
    assert store.resolve("m") == store.resolve("m", "latest") == v2
    assert store.resolve("m", v1) == v1 and store.resolve("m", v2[:6]) == v2
    assert torch.equal(store.get("m", "release")["a"], torch.zeros(2))
    store.tag("m", "latest", "release")  # a tag moves
    assert store.resolve("m", "release") == v2


@pytest.mark.parametrize("ref", ["nope", "0000000", "12345", "latest2"])
def test_unknown_refs_are_version_not_found(store, ref):
    store.put({"a": torch.zeros(2)}, "m")
    with pytest.raises(VersionNotFoundError, match=f"no version or ref {ref!r}"):
        store.resolve("m", ref)
    with pytest.raises(VersionNotFoundError):
        store.get("m", ref)


@pytest.mark.parametrize("call", [
    lambda s: s.log("ghost"), lambda s: s.get("ghost"), lambda s: s.resolve("ghost"),
    lambda s: s.tag("ghost", "latest", "t"), lambda s: s.diff("ghost", "latest", "latest"),
], ids=["log", "get", "resolve", "tag", "diff"])
def test_unknown_model_is_version_not_found(store, call):
    store.put({"a": torch.zeros(1)}, "m")
    with pytest.raises(VersionNotFoundError, match="model 'ghost' is not in the store"):
        call(store)


def test_a_parent_that_does_not_exist_is_refused(store):
    with pytest.raises(VersionNotFoundError, match="model 'ghost' is not in the store"):
        store.put({"a": torch.zeros(1)}, "ghost", parent="v1")
    store.put({"a": torch.zeros(1)}, "m")
    with pytest.raises(VersionNotFoundError, match="no version or ref 'v9'"):
        store.put({"a": torch.ones(1)}, "m", parent="v9")
    assert len(store.log("m")) == 1


@pytest.mark.parametrize("tag", ["../x", "a/b", "", ".t", "-t"])
def test_bad_tag_names_are_refused(store, tag):
    store.put({"a": torch.zeros(1)}, "m")
    with pytest.raises(StoreError, match="invalid tag name"):
        store.tag("m", "latest", tag)


def test_diff_reports_added_removed_changed_and_same_with_right_numbers(store):
    a = torch.randn(10, 10)
    v1 = store.put({"same": torch.ones(3), "changed": a, "removed": torch.zeros(2), "reshaped": torch.arange(4.0),
                    "ints": torch.arange(5)}, "m")
    b = a.clone()
    b[3, 4] += 0.5
    b[7, 1] -= 0.25
    v2 = store.put({"same": torch.ones(3), "changed": b, "added": torch.zeros(1), "reshaped": torch.ones(2, 2),
                    "ints": torch.arange(5) * 2}, "m")
    rows = {r["tensor"]: r for r in store.diff("m", v1, v2)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "added": "added", "changed": "changed", "ints": "changed", "removed": "removed", "reshaped": "changed",
        "same": "same"}
    delta = b.double() - a.double()
    assert rows["changed"]["max_abs"] == pytest.approx(float(delta.abs().max()), rel=0, abs=0)
    assert rows["changed"]["rel_l2"] == pytest.approx(float(delta.norm() / a.double().norm()), rel=1e-12)
    assert rows["changed"]["changed_chunks"] == 1
    assert rows["ints"]["max_abs"] == 4.0
    assert rows["reshaped"]["detail"] == "float32[4] -> float32[2, 2]"
    assert [r["tensor"] for r in store.diff("m", v1, v2)] == sorted(rows)
    assert all(r["status"] == "same" for r in store.diff("m", v2, v2))



@pytest.mark.parametrize("before, after", [(torch.zeros(4), torch.zeros(2, 2)),
                                           (torch.zeros(4, dtype=torch.int32), torch.zeros(4))])
def test_diff_sees_a_reshape_or_retype_with_the_same_bytes(store, before, after):
    v1 = store.put({"t": before}, "m")
    v2 = store.put({"t": after}, "m")
    assert [r["status"] for r in store.diff("m", v1, v2)] == ["changed"]


# ---------------------------------------------------------------- gc

def test_gc_removes_orphans_and_temporaries_and_keeps_every_version(store):
    state1 = {"a": torch.randn(16, 16), "b": torch.arange(9)}
    state2 = {"a": state1["a"] + 1e-4, "c": torch.ones(5)}
    store.put(state1, "m")
    store.put(state2, "m")
    used = chunk_files(store.root)
    orphan = b"left by a killed writer"
    store.backend.put_if_absent(chunk_key(chunk_id(orphan)), [ChunkHeader(Raw(), len(orphan)).to_bytes(), orphan])
    (store.root / "tmp" / "x.part").write_bytes(b"partial")
    (store.root / "tmp" / "cache-abc-1").mkdir()
    (store.root / "tmp" / "cache-abc-1" / "f").write_bytes(b"partial")
    assert store.gc() == type(store.gc())(0, 0, 0, 1)  # younger than the grace period: kept
    report = store.gc(grace=0)
    assert (report.chunks_removed, report.bytes_removed, report.temporaries_removed) == (
        1, len(ChunkHeader(Raw(), len(orphan)).to_bytes()) + len(orphan), 2)
    assert chunk_files(store.root) == used and list((store.root / "tmp").iterdir()) == []
    assert store.verify().ok
    assert_identical(store.get("m", store.log("m")[1].id), state1)
    assert_identical(store.get("m"), state2)
    assert store.gc(grace=0) == type(report)(0, 0, 0)


def _forget_version(store: Store, vid: str) -> None:
    """What deleting a version would do (the API has no delete): its rows go, its chunks stay."""
    with store.catalog.transaction() as catalog:
        for table, column in (("tensors", "version"), ("files", "version"), ("refs", "version"), ("versions", "id")):
            catalog.rows(f"DELETE FROM {table} WHERE {column}=?", (vid,))


def test_gc_removes_a_chunk_only_when_no_version_uses_it_as_data_or_base(store):
    parent = {"w": torch.randn(64, 64), "only_parent": torch.randn(8, 8), "shared": torch.ones(6)}
    child = {"w": parent["w"] + 1e-4 * torch.randn(64, 64), "shared": torch.ones(6)}
    v1 = store.put(parent, "m")
    v2 = store.put(child, "m")
    parent_chunks, child_chunks = tensor_chunks(store, v1), tensor_chunks(store, v2)
    assert store.catalog.chunk(child_chunks["w"][0]).base == parent_chunks["w"][0]  # child's w rests on parent's
    assert store.gc(grace=0).chunks_removed == 0
    _forget_version(store, v1)
    report = store.gc(grace=0)
    assert report.chunks_removed == 1
    remaining = chunk_files(store.root)
    assert parent_chunks["only_parent"][0] not in remaining
    assert parent_chunks["w"][0] in remaining and parent_chunks["shared"][0] in remaining
    assert_identical(store.get("m"), child)
    assert store.verify().ok
    _forget_version(store, v2)
    assert store.gc(grace=0).chunks_removed == 3 and chunk_files(store.root) == set()


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("preset", ["int8", "int4"])
def test_compressed_model_round_trips_with_identical_outputs(store, tiny_net, preset):
    skeleton = copy.deepcopy(tiny_net)
    model = modelpress.compress(tiny_net, preset)
    store.put(model, "tiny", message=preset)
    assert any("::" in name for name in store.get("tiny"))  # encoding parts stored as tensors
    loaded = store.load("tiny", skeleton=skeleton)
    with torch.inference_mode():
        assert torch.equal(loaded(IDS), model(IDS))
    assert modelpress.provenance(loaded).recipe == modelpress.provenance(model).recipe


def test_plain_module_needs_its_skeleton_and_state_dicts_are_not_models(store, tiny_net):
    store.put(modelpress.compress(tiny_net, "int8"), "tiny")
    with pytest.raises(FormatError, match="pass the uncompressed model"):
        store.load("tiny")
    store.put({"a": torch.zeros(1)}, "sd")
    with pytest.raises(StoreError, match="plain state dict"):
        store.load("sd")


def test_corrupt_chunk_of_a_model_stops_load(store, tiny_net):
    skeleton = copy.deepcopy(tiny_net)
    vid = store.put(modelpress.compress(tiny_net, "int4"), "tiny")
    cid = max(tensor_chunks(store, vid).values(), key=len)[0]
    _corrupt_payload(store, cid)
    with pytest.raises(CorruptChunkError, match=cid[:12]):
        store.load("tiny", skeleton=skeleton)


def test_store_reopens_with_the_same_content(tmp_path):
    state = {"a": torch.randn(5, 5), "b": torch.arange(3)}
    with Store.init(tmp_path / "s") as s:
        vid = s.put(state, "m", tags=("keep",))
    with Store.init(tmp_path / "s") as s:  # init on an existing store opens it
        assert s.resolve("m", "keep") == vid
        assert_identical(s.get("m"), state)
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_init_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "junk").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        Store.init(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]


def test_catalog_transaction_rolls_back_on_error(store):
    store.put({"a": torch.zeros(1)}, "m")
    with pytest.raises(RuntimeError):
        with store.catalog.transaction() as catalog:
            catalog.set_ref("m", "half", store.resolve("m"))
            raise RuntimeError("abort")
    with pytest.raises(VersionNotFoundError):
        store.resolve("m", "half")
