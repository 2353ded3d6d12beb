"""Remotes under faults: interrupted and killed pushes, concurrent writers, hostile remotes, remote gc and verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from _remote_support import chunk_puts, counting_remote, s3_endpoint, s3_url  # noqa: F401 (fixtures)
from modelpress.errors import ModelpressError, StoreError, VersionNotFoundError
from modelpress.store import Store
from modelpress.store.objects import chunk_key
from modelpress.store.remote import Remote
from modelpress.store.remote_maint import gc_remote, verify_remote
from modelpress.store.remote_pull import pull
from modelpress.store.remote_push import FETCH_FIRST, push
from modelpress.store.remote_records import ref_key, version_key

_SUPPORT = Path(__file__).with_name("_remote_support.py")


def _state(seed: int, rows: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(rows, 32, generator=g) for i in range(6)}


def _assert_invisible(url: str, model: str) -> None:
    """No ref names a version of `model` (a reader sees nothing of a half-finished push)."""
    assert Remote(url).refs(model) == {}
    with Store.open(url) as remote, pytest.raises(VersionNotFoundError):
        remote.get(model)


def test_interrupted_push_is_invisible_and_resumes_without_resending(tmp_path, s3_url, small_chunks):
    with Store.init(tmp_path / "a") as store:
        vid = store.put(_state(0), "m")
        needed = set(store.catalog.all_chunk_ids())
        assert len(needed) >= 12
        remote, first = counting_remote(s3_url, fail_after=5)
        with pytest.raises(ConnectionError):
            push(store, remote, "m")
        landed = set(chunk_puts(first))
        assert 1 <= len(landed) <= 5 + remote.threads
        _assert_invisible(s3_url, "m")
        remote, second = counting_remote(s3_url)
        report = push(store, remote, "m")
        resent = set(chunk_puts(second))
        assert not (resent & landed)  # no chunk sent twice
        assert {k.rsplit("/", 1)[1] for k in landed | resent} == needed
        assert len(chunk_puts(second)) == len(resent) == report.chunks_sent
        assert report.chunks_skipped == len(landed)
    assert Remote(s3_url).resolve("m") == vid
    assert verify_remote(Remote(s3_url)).ok


@pytest.mark.slow  # a process killed midway (make test runs it; test-fast does not)
def test_killed_push_process_resumes_without_resending(tmp_path, s3_url, small_chunks):
    with Store.init(tmp_path / "a") as store:
        vid = store.put(_state(1, rows=256), "m")
        total = len(store.catalog.all_chunk_ids())
    child = subprocess.Popen([sys.executable, str(_SUPPORT), "push", str(tmp_path / "a"), s3_url, "m", "0.05"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    remote = Remote(s3_url)
    deadline = time.monotonic() + 120
    while len(remote.chunk_sizes()) < 4 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    there = set(remote.chunk_sizes())
    assert 4 <= len(there) < total
    _assert_invisible(s3_url, "m")
    with Store(tmp_path / "a") as store:
        r2, counter = counting_remote(s3_url)
        report = push(store, r2, "m")
    sent = {k.rsplit("/", 1)[1] for k in chunk_puts(counter)}
    assert not (sent & there) and len(sent) + len(there) == total
    assert report.chunks_skipped == len(there) and report.chunks_sent == total - len(there)
    assert Remote(s3_url).resolve("m") == vid and verify_remote(Remote(s3_url)).ok


def test_a_ref_moved_meanwhile_is_a_fetch_first_error_and_no_version_is_lost(tmp_path, s3_url, small_chunks):
    """Writer A reads the ref, writer B pushes before A's conditional write: A's write fails, A says fetch first."""
    a, b = Store.init(tmp_path / "a"), Store.init(tmp_path / "b")
    with a, b:
        va, vb = a.put(_state(2), "m"), b.put(_state(3), "m")
        remote_a = Remote(s3_url)
        read_ref = remote_a.tagged_ref
        raced = []

        def interleaved(model, ref):
            seen = read_ref(model, ref)
            if not raced:
                raced.append(push(b, Remote(s3_url), "m"))  # B lands between A's read and A's write
            return seen

        remote_a.tagged_ref = interleaved
        with pytest.raises(StoreError, match=FETCH_FIRST):
            push(a, remote_a, "m")
        remote = Remote(s3_url)
        assert remote.resolve("m") == vb
        assert {va, vb} <= set(remote.version_ids())  # A's version is on the remote: pull, rebase, push again
        assert verify_remote(remote).ok
        pull(a, remote, "m")  # A fetches first ...
        assert a.resolve("m") == va  # ... its own latest kept (it does not lead to B's)
        assert a.resolve("m", vb) == vb
        child = a.put(_state(4), "m", parent=vb)
        push(a, Remote(s3_url), "m")  # ... and a child of B's version goes through
        assert Remote(s3_url).resolve("m") == child
        with pytest.raises(StoreError, match=FETCH_FIRST):
            push(b, Remote(s3_url), "m")  # B is behind now
        push(b, Remote(s3_url), "m", force=True)  # unless it insists
        assert Remote(s3_url).resolve("m") == vb


@pytest.mark.slow  # two processes racing
def test_two_processes_pushing_the_same_model_at_once(tmp_path, s3_url, small_chunks):
    for i in range(2):
        with Store.init(tmp_path / f"s{i}") as store:
            store.put(_state(10 + i, rows=128), "m")
    procs = [subprocess.Popen([sys.executable, str(_SUPPORT), "push", str(tmp_path / f"s{i}"), s3_url, "m", "0.002"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out, err))
    ok = [r for r in results if r[0] == 0]
    failed = [r for r in results if r[0] != 0]
    assert len(ok) >= 1
    for _, _, err in failed:  # unrelated histories: the loser must say fetch first, nothing else
        assert FETCH_FIRST in err, err
    remote = Remote(s3_url)
    vids = set()
    for i in range(2):
        with Store(tmp_path / f"s{i}") as store:
            vids.add(store.resolve("m"))
    assert vids <= set(remote.version_ids())  # both versions are on the remote
    assert remote.resolve("m") in vids
    report = verify_remote(remote)
    assert report.ok, report.problems  # no ref points at a missing chunk


def _pushed(tmp_path: Path, url: str) -> tuple[Store, str]:
    store = Store.init(tmp_path / "a")
    vid = store.put(_state(5), "m", codecs={"*": "raw"})  # chunks of equal sizes
    push(store, Remote(url), "m")
    return store, vid


def _local_unchanged(tmp_path: Path) -> None:
    with Store.init(tmp_path / "local") as local:
        assert local.models() == [("keep", 1)] and local.verify().ok
        assert local.resolve("keep") == local.catalog.version_ids()[0]


def _hostile_pull(tmp_path: Path, url: str, match: str) -> None:
    with Store.init(tmp_path / "local") as local:
        local.put(_state(9), "keep", parent=None)
        before = sorted(p.name for p in (tmp_path / "local" / "chunks").rglob("*") if p.is_file())
        with pytest.raises(ModelpressError, match=match):
            pull(local, Remote(url), "m")
        with pytest.raises(ModelpressError, match=match):
            Store.open(url).get("m")
        after = sorted(p.name for p in (tmp_path / "local" / "chunks").rglob("*") if p.is_file())
        assert set(before) <= set(after)
    _local_unchanged(tmp_path)


def test_hostile_remote_chunk_whose_bytes_do_not_match_its_name(tmp_path, s3_url, small_chunks):
    store, vid = _pushed(tmp_path, s3_url)
    with store:
        ids = store._chunks_of(store.version("m"))
        victim, donor = sorted(ids)[:2]
        backend = Remote(s3_url).backend
        size_v = len(backend.get(chunk_key(victim), 1 << 20))
        donor_bytes = backend.get(chunk_key(donor), 1 << 20)
        assert len(donor_bytes) == size_v  # same-sized chunk of another content: only the hash can tell
        backend.put(chunk_key(victim), [donor_bytes])
    _hostile_pull(tmp_path, s3_url, "damaged|hash|corrupt")
    report = verify_remote(Remote(s3_url))
    assert not report.ok and any(victim in p for p in report.problems)


def test_hostile_remote_truncated_object(tmp_path, s3_url, small_chunks):
    store, vid = _pushed(tmp_path, s3_url)
    with store:
        victim = sorted(store._chunks_of(store.version("m")))[0]
    backend = Remote(s3_url).backend
    backend.put(chunk_key(victim), [backend.get(chunk_key(victim), 1 << 20)[:-100]])
    _hostile_pull(tmp_path, s3_url, "truncated|bytes|corrupt")
    assert any(victim in p for p in verify_remote(Remote(s3_url)).problems)


def test_hostile_remote_ref_naming_a_missing_version(tmp_path, s3_url, small_chunks):
    store, vid = _pushed(tmp_path, s3_url)
    store.close()
    Remote(s3_url).backend.delete(version_key(vid))
    _hostile_pull(tmp_path, s3_url, "record is missing")
    assert not verify_remote(Remote(s3_url)).ok


def test_hostile_remote_tampered_record_and_ref(tmp_path, s3_url, small_chunks):
    store, vid = _pushed(tmp_path, s3_url)
    store.close()
    backend = Remote(s3_url).backend
    record = json.loads(Remote(s3_url).record(vid).body)  # written back below as plain JSON, which is still read
    first, second = record["tensors"][0], record["tensors"][1]
    first[3], second[3] = second[3], first[3]  # swap two tensors' chunk lists
    backend.put(version_key(vid), [json.dumps(record).encode()])
    _hostile_pull(tmp_path, s3_url, "hash to its name")
    backend.put(ref_key("m", "latest"), [b'{"version": "../../etc/passwd"}'])
    _hostile_pull(tmp_path, s3_url, "not a valid ref")


def test_remote_gc_removes_only_what_no_ref_reaches_after_the_grace_period(tmp_path, s3_url, small_chunks):
    with Store.init(tmp_path / "a") as store:
        v1 = store.put(_state(6), "m")
        push(store, Remote(s3_url), "m")
        v2 = store.put({**_state(6), "layer0.weight": torch.zeros(64, 32)}, "m")
        push(store, Remote(s3_url), "m")
        store.put(_state(7), "orphan")
        with pytest.raises(ConnectionError):  # an interrupted push: chunks no record or ref names
            push(store, counting_remote(s3_url, fail_after=3)[0], "orphan")
        remote = Remote(s3_url)
        before = remote.chunk_sizes()
        assert gc_remote(remote).chunks_removed == 0  # all young: a push may be in flight
        report = gc_remote(remote, grace=0)
        assert report.chunks_removed >= 1
        after = remote.chunk_sizes()
        needed = store._chunks_of(store.version("m", v1)) | store._chunks_of(store.version("m", v2))
        assert needed <= set(after) and set(after) < set(before)
        assert verify_remote(remote).ok
        with Store.init(tmp_path / "b") as other:
            pull(other, remote, "m")
            assert other.resolve("m") == v2


def test_concurrent_uploads_do_not_block_a_reader(tmp_path, s3_url, small_chunks):
    """A reader loading version 1 while version 2 is pushed sees version 1, whole."""
    with Store.init(tmp_path / "a") as store:
        store.put(_state(8), "m")
        push(store, Remote(s3_url), "m")
        want = store.get("m")
        store.put(_state(9), "m")
        errors: list[BaseException] = []

        def read() -> None:
            try:
                for _ in range(3):
                    with Store.open(s3_url) as remote:
                        got = remote.get("m")
                    assert all(torch.equal(got[k], want[k]) for k in want) or set(got) == set(want)
            except BaseException as exc:  # reported below
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        push(store, Remote(s3_url), "m")
        reader.join()
        assert not errors


def test_hostile_record_claiming_a_huge_chunk_is_refused_before_reading(tmp_path, s3_url, small_chunks):
    store, vid = _pushed(tmp_path, s3_url)
    store.close()
    backend = Remote(s3_url).backend
    record = json.loads(Remote(s3_url).record(vid).body)  # written back below as plain JSON, which is still read
    cid = sorted(record["chunks"])[0]
    record["chunks"][cid][3] = 1 << 40  # stored_size: chunk rows are outside the root hash, so only checks stop it
    backend.put(version_key(vid), [json.dumps(record, sort_keys=True, separators=(",", ":")).encode()])
    _hostile_pull(tmp_path, s3_url, "impossible|stored size|more than")


def test_interrupted_pull_resumes_without_fetching_again_and_commits_nothing_half(tmp_path, s3_url, small_chunks):
    store, vid = _pushed(tmp_path, s3_url)
    with store:
        want = store.get("m")
    with Store.init(tmp_path / "b") as local:
        remote, first = counting_remote(s3_url, fail_gets_after=4)
        remote.threads = 1
        with pytest.raises(ConnectionError):
            pull(local, remote, "m")
        assert local.models() == []  # nothing committed: no half version
        remote, second = counting_remote(s3_url)
        report = pull(local, remote, "m")
        assert not (set(first.gets) & set(second.gets))  # what arrived (checked, on disk) is adopted, not fetched
        assert report.chunks_skipped == len(first.gets) and report.chunks_sent == len(second.gets)
        got = local.get("m")
        assert all(torch.equal(got[k], want[k]) for k in want) and local.verify().ok
