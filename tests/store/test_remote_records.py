"""Version records on a remote: compressed, a child's coded against its parent's record; chains bounded; hostile
records refused with one clear error; gc never removes a record another kept one is coded against."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import zstandard

from modelpress.errors import FormatError, ModelpressError
from modelpress.store import Store
from modelpress.store.remote import Remote
from modelpress.store.remote_maint import gc_remote, verify_remote
from modelpress.store.remote_push import push
from modelpress.store.remote_pull import clone
from modelpress.store.remote_records import MAX_CHAIN, RECORD_MAGIC, version_key


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(48, 32, generator=g) for i in range(8)}


def _lineage(store: Store, remote_url: str, generations: int) -> list[str]:
    """A model and `generations` children, each changing one tensor, pushed one by one."""
    state = _state(0)
    ids = [store.put(state, "m")]
    push(store, Remote(remote_url), "m")
    for n in range(generations):
        state = {**state, f"layer{n % 8}.weight": state[f"layer{n % 8}.weight"] + 0.01}
        ids.append(store.put(state, "m", message=f"step {n}"))
        push(store, Remote(remote_url), "m")
    return ids


def _stored(url: str, vid: str) -> bytes:
    return bytes(Remote(url).backend.get(version_key(vid), 1 << 24))


def test_a_childs_record_is_coded_against_its_parents_and_reads_back_whole(tmp_path, small_chunks):
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, 2)
        parent, child = _stored(url, ids[1]), _stored(url, ids[2])
        assert parent.startswith(RECORD_MAGIC) and child[len(RECORD_MAGIC):][:64] == ids[1].encode()
        body = Remote(url).record(ids[2]).body
        assert json.loads(body)["parent"] == ids[1]
        assert len(child) * 10 < len(body)  # one changed tensor of eight: the rest comes from the parent's record
        alone = zstandard.ZstdCompressor(level=19).compress(body)
        assert len(child) * 3 < len(alone)  # and far less than the record compressed on its own
        record = Remote(url).record(ids[2])
        assert record.bases == (ids[1], ids[0]) and record.version.info.id == ids[2]
        cloned, _ = clone(url, tmp_path / "b")
        with cloned:
            assert cloned.catalog.version(ids[2]).tensors == store.catalog.version(ids[2]).tensors


def test_chains_start_afresh_below_the_limit(tmp_path, small_chunks):
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, MAX_CHAIN + 3)
    depths = [len(Remote(url).record(vid).bases) for vid in ids]
    assert max(depths) == MAX_CHAIN and depths[MAX_CHAIN + 1] == 0  # the record after the deepest stands alone
    assert depths == [n % (MAX_CHAIN + 1) for n in range(len(ids))]


def test_gc_keeps_the_records_a_kept_record_is_coded_against(tmp_path, small_chunks):
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, 3)
    remote = Remote(url)
    remote.backend.delete("refs/m/latest")  # nothing named any more
    old = time.time() - 1000
    for path in (tmp_path / "remote").rglob("*"):  # everything old but the newest record
        if path.is_file() and path.name != ids[-1]:
            os.utime(path, (old, old))
    report = gc_remote(remote, grace=100)
    assert report.versions_removed == 0, "the young record needs its parents' records to be read"
    record = Remote(url).record(ids[-1])
    assert record.bases == tuple(reversed(ids[:-1]))


def _tamper(url: str, vid: str, data: bytes) -> None:
    Remote(url).backend.put(version_key(vid), [data])


def _refused(url: str, vid: str, match: str) -> None:
    with pytest.raises(ModelpressError, match=match):
        Remote(url).record(vid)


def test_hostile_records_are_refused(tmp_path, small_chunks):
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, 2)
    root, parent, child = ids
    stored = _stored(url, child)
    frame = stored[len(RECORD_MAGIC) + 64:]
    # coded against a record other than its parent's: the frame does not decode against it (or names a stranger)
    _tamper(url, child, RECORD_MAGIC + root.encode() + frame)
    _refused(url, child, "damaged")
    # naming itself, or a loop of bases
    _tamper(url, child, RECORD_MAGIC + child.encode() + frame)
    _refused(url, child, "invalid base")
    _tamper(url, parent, RECORD_MAGIC + child.encode() + _stored(url, parent)[len(RECORD_MAGIC) + 64:])
    _tamper(url, child, stored)
    _refused(url, child, "chain|loop|damaged")
    # a base id that is no id, a frame that is not zstd, a truncated frame
    _tamper(url, child, RECORD_MAGIC + b"../../etc/passwd".ljust(64, b"x") + frame)
    _refused(url, child, "invalid base")
    _tamper(url, child, RECORD_MAGIC + b"-" * 64 + b"not a zstd frame at all")
    _refused(url, child, "does not decompress")
    _tamper(url, child, stored[:-7])
    _refused(url, child, "damaged")


def test_a_record_that_expands_past_the_limit_is_refused_without_holding_it(tmp_path, monkeypatch):
    url = str(tmp_path / "remote")
    remote = Remote(url)
    remote.ensure()
    vid = "ab" * 32
    bomb = zstandard.ZstdCompressor(level=3).compress(b"[" * 1 + b" " * (4 << 20) + b"]")
    import modelpress.store.remote_records as records
    monkeypatch.setattr(records, "MAX_RECORD", 1 << 20)
    remote.backend.put(version_key(vid), [RECORD_MAGIC + b"-" * 64 + bomb])
    with pytest.raises(FormatError, match="expands past"):
        Remote(url).record(vid)


def test_plain_json_records_of_earlier_remotes_are_still_read(tmp_path, small_chunks):
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, 1)
    for vid in ids:  # as an earlier modelpress wrote them: JSON, uncompressed
        _tamper(url, vid, Remote(url).record(vid).body)
    assert Remote(url).record(ids[1]).bases == ()
    assert verify_remote(Remote(url)).ok


def test_a_parent_record_removed_during_the_gc_wait_makes_the_push_stand_alone(tmp_path, small_chunks, monkeypatch):
    """A gc that ran before the push's marker could be seen may remove the parent's record (no ref named it): the
    push then names every chunk in a new marker and writes its record uncoded."""
    url = str(tmp_path / "remote")
    import modelpress.store.remote_push as pushing
    with Store.init(tmp_path / "a") as store:
        root = store.put(_state(0), "m")
        push(store, Remote(url), "m")
        child = store.put({**_state(0), "layer0.weight": torch.zeros(48, 32)}, "m")
        markers = []
        real = pushing.announce_push

        def announce(remote, versions, chunks):
            markers.append((sorted(versions), len(chunks)))
            lease = real(remote, versions, chunks)
            if len(markers) == 1:
                remote.backend.delete(version_key(root))  # what that gc did while this push waited for it
            return lease

        monkeypatch.setattr(pushing, "announce_push", announce)
        report = push(store, Remote(url), "m")
        n_chunks = len(store._chunks_of(store.catalog.version(child)))
    assert markers[0] == (sorted([child, root]), 1) and markers[1] == ([child], n_chunks)
    assert Remote(url).record(child).bases == () and report.refs


def test_a_version_1_remote_is_read_and_marked_version_2_by_the_next_push(tmp_path, small_chunks):
    """An older modelpress cannot read compressed records, and its gc would miss the chunks a marker names by a
    base record: the first push that writes them marks the remote version 2, which such a modelpress refuses."""
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, 0)
        backend = Remote(url).backend
        backend.put("REMOTE", [json.dumps({"format": "modelpress.remote", "version": 1}).encode()])
        _tamper(url, ids[0], Remote(url).record(ids[0]).body)  # as version 1 wrote it
        assert Remote(url).check() == 1 and Remote(url).record(ids[0]).version.info.id == ids[0]
        store.put({**_state(0), "layer0.weight": torch.zeros(48, 32)}, "m")
        push(store, Remote(url), "m")
    assert json.loads(backend.get("REMOTE", 4096)) == {"format": "modelpress.remote", "version": 2}
    backend.put("REMOTE", [json.dumps({"format": "modelpress.remote", "version": 3}).encode()])
    with pytest.raises(FormatError, match="upgrade modelpress"):
        Remote(url).check()


def test_a_base_whose_own_base_is_gone_makes_the_push_stand_alone(tmp_path, small_chunks, monkeypatch):
    """The chain under a base counts too: the parent's record is there but the record it is coded against was
    removed (a gc stopped part-way): the child's record must not be coded against a chain that cannot be read."""
    url = str(tmp_path / "remote")
    import modelpress.store.remote_push as pushing
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, 1)
        grand = store.put({**_state(0), "layer5.weight": torch.zeros(48, 32)}, "m")
        real = pushing.announce_push
        calls = []

        def announce(remote, versions, chunks):
            calls.append(sorted(versions))
            lease = real(remote, versions, chunks)
            if len(calls) == 1:
                remote.backend.delete(version_key(ids[0]))  # the root, under the parent's record
            return lease

        monkeypatch.setattr(pushing, "announce_push", announce)
        push(store, Remote(url), "m")
    assert calls[0] == sorted([grand, ids[1]]) and calls[1] == [grand]
    assert Remote(url).record(grand).bases == ()


def test_an_existing_record_whose_base_is_gone_is_replaced(tmp_path, small_chunks):
    """A record left by an earlier push, coded against a record since removed, is written again uncoded."""
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        ids = _lineage(store, url, 1)
        remote = Remote(url)
        remote.backend.delete("refs/m/latest")
        remote.backend.delete(version_key(ids[0]))
        with pytest.raises(ModelpressError, match="missing"):
            Remote(url).record(ids[1])
        report = push(store, Remote(url), "m")
    assert Remote(url).record(ids[1]).bases == () and report.refs and verify_remote(Remote(url)).ok


def test_the_chain_limit_holds_whatever_is_cached(tmp_path, small_chunks, monkeypatch):
    url = str(tmp_path / "remote")
    import modelpress.store.remote_records as records
    with Store.init(tmp_path / "a") as store:
        monkeypatch.setattr(records, "MAX_CHAIN", 20)  # a writer that chains deeper than readers allow
        ids = _lineage(store, url, 10)
    monkeypatch.setattr(records, "MAX_CHAIN", 8)
    remote = Remote(url)
    remote.record(ids[8])  # 8 deep: allowed, and cached with its bases
    with pytest.raises(FormatError, match="chain"):
        remote.record(ids[9])
