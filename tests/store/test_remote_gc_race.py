"""Remote gc against pushes in flight (store/remote_leases.py): the interleavings that used to lose a chunk a push
had skipped, forced with hooks on the object store, and the expiry of markers left by killed processes.

The scene of each race: model `a` was pushed and its ref removed, so its chunks are on the remote, old (the gcs
here run with grace 0) and unreferenced; model `b` holds the same tensors, so a push of `b` skips every chunk."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from _remote_support import Counting, s3_endpoint, s3_url  # noqa: F401 (fixtures)
from modelpress.errors import StoreError
from modelpress.store import Store
from modelpress.store import remote_leases
from modelpress.store.remote import Remote
from modelpress.store.remote_maint import gc_remote, verify_remote
from modelpress.store.remote_push import push
from modelpress.store.remote_records import ref_key

_WAIT = 20.0  # seconds any step of a test may take before it is a failure (a hang, not a timing)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    return {f"layer{i}.weight": torch.randn(64, 32, generator=g) for i in range(4)}


class Hooked(Counting):
    """A backend whose first chunk listing (or first chunk delete) signals `reached` and waits for `go`."""

    def __init__(self, inner, pause_on: str):
        super().__init__(inner)
        self.pause_on = pause_on
        self.reached, self.go = threading.Event(), threading.Event()
        self.listed_chunks = threading.Event()

    def _pause(self) -> None:
        if not self.reached.is_set():
            self.reached.set()
            assert self.go.wait(_WAIT)

    def list(self, prefix):
        if prefix == "chunks":
            self.listed_chunks.set()
            if self.pause_on == "list":
                self._pause()
        return super().list(prefix)

    def delete(self, key):
        if key.startswith("chunks/") and self.pause_on == "delete":
            self._pause()
        super().delete(key)


def _hooked(url: str, pause_on: str) -> tuple[Remote, Hooked]:
    backend = Hooked(Remote(url).backend, pause_on)
    return Remote(url, backend=backend), backend


def _scene(tmp_path, url: str) -> tuple[Store, set[str]]:
    store = Store.init(tmp_path / "s")
    store.put(_state(), "a")
    push(store, Remote(url), "a")
    Remote(url).backend.delete(ref_key("a", "latest"))  # a's chunks: old (grace 0) and unreferenced
    vid = store.put(_state(), "b")
    return store, store._chunks_of(store.version("b", vid))


def _run(fn, results: dict, name: str) -> threading.Thread:
    def body():
        try:
            results[name] = fn()
        except BaseException as exc:  # checked by the test
            results[name] = exc
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _check_clean(url: str, store: Store, needed: set[str]) -> None:
    remote = Remote(url)
    assert remote.resolve("b") == store.resolve("b")
    assert needed <= set(remote.chunk_sizes())  # the ref names no missing chunk
    report = verify_remote(remote)
    assert report.ok, report.problems
    assert not list(remote.backend.list("pushes")) and not list(remote.backend.list("gc"))  # markers removed


def test_push_listed_before_gc_decided_and_finished_before_gc_deleted(tmp_path, s3_url, small_chunks):
    """The race the last round left: the push lists (skipping a's chunks), gc then decides they are unreachable,
    the push moves its ref, gc deletes. gc must have seen the push's marker and kept them."""
    store, needed = _scene(tmp_path, s3_url)
    with store:
        pusher, push_backend = _hooked(s3_url, "list")
        collector, gc_backend = _hooked(s3_url, "delete")
        results: dict = {}
        push_thread = _run(lambda: push(store, pusher, "b"), results, "push")
        assert push_backend.reached.wait(_WAIT)  # the push has listed the chunks: all there, all skipped
        gc_thread = _run(lambda: gc_remote(collector, grace=0), results, "gc")
        deadline = time.monotonic() + _WAIT  # gc decides: it ends, or (without the markers) waits at a chunk delete
        while gc_thread.is_alive() and not gc_backend.reached.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        push_backend.go.set()
        push_thread.join(_WAIT)
        gc_backend.go.set()  # any chunk delete gc had decided on goes ahead now
        gc_thread.join(_WAIT)
        assert not isinstance(results["push"], BaseException), results["push"]
        assert not isinstance(results["gc"], BaseException), results["gc"]
        _check_clean(s3_url, store, needed)  # without the markers: b@latest names chunks gc deleted
        assert results["push"].chunks_sent == 0 and results["push"].chunks_skipped == len(needed)
        assert results["gc"].chunks_removed == 0 and results["gc"].kept_for_pushes == len(needed)


def test_push_starting_while_gc_deletes_waits_for_it(tmp_path, small_chunks, monkeypatch):
    """gc decided first and is deleting: a push that starts now must not list (and skip) chunks until gc is done."""
    monkeypatch.setattr(remote_leases, "_POLL", 0.01)
    url = str(tmp_path / "remote")
    store, needed = _scene(tmp_path, url)
    with store:
        collector, gc_backend = _hooked(url, "delete")
        pusher, push_backend = _hooked(url, "never")
        results: dict = {}
        gc_thread = _run(lambda: gc_remote(collector, grace=0), results, "gc")
        assert gc_backend.reached.wait(_WAIT)  # gc is about to delete a's chunks
        push_thread = _run(lambda: push(store, pusher, "b"), results, "push")
        assert not push_backend.listed_chunks.wait(0.5)  # the push waits for gc before it looks at the chunks
        gc_backend.go.set()
        gc_thread.join(_WAIT)
        push_thread.join(_WAIT)
        assert not isinstance(results["gc"], BaseException), results["gc"]
        assert not isinstance(results["push"], BaseException), results["push"]
        assert results["gc"].chunks_removed == len(needed)
        assert results["push"].chunks_sent == len(needed)  # gc removed them all: the push sent them all again
        _check_clean(url, store, needed)


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_markers_of_killed_processes_expire(tmp_path, small_chunks, monkeypatch):
    monkeypatch.setattr(remote_leases, "_POLL", 30.0)  # a push that waited would time the test out
    url = str(tmp_path / "remote")
    store, needed = _scene(tmp_path, url)
    with store:
        remote = Remote(url)
        remote.backend.put("gc/" + "0" * 32, [b'{"format": "modelpress.gc"}'])  # a gc killed long ago
        _age(tmp_path / "remote" / "gc" / ("0" * 32), 2 * remote_leases.GC_LEASE)
        results: dict = {}
        _run(lambda: push(store, remote, "b"), results, "push").join(_WAIT)
        assert results["push"].chunks_skipped == len(needed)  # it went ahead: the stale gc marker is ignored
        marker = {"format": "modelpress.push", "versions": [], "chunks": sorted(needed)}
        for name, age in (("1" * 32, 0.0), ("2" * 32, 2 * remote_leases.PUSH_LEASE)):  # a live and a killed push
            remote.backend.put(f"pushes/{name}", [json.dumps(marker).encode()])
            _age(tmp_path / "remote" / "pushes" / name, age)
        remote.backend.delete(ref_key("b", "latest"))
        kept = gc_remote(remote, grace=0)
        assert kept.chunks_removed == 0 and kept.kept_for_pushes == len(needed)
        assert kept.markers_removed == 2  # the killed push's and the killed gc's
        assert [e.key for e in remote.backend.list("pushes")] == ["pushes/" + "1" * 32]
        remote.backend.put("pushes/" + "1" * 32, [b"{not json"])
        with pytest.raises(StoreError, match="push marker .* is unreadable"):
            gc_remote(remote, grace=0)  # what an unreadable live marker protects is unknown: nothing removed
        assert needed <= set(remote.chunk_sizes())
        remote.backend.delete("pushes/" + "1" * 32)
        assert gc_remote(remote, grace=0).chunks_removed == len(needed)


def test_gc_stops_deleting_when_its_lease_runs_out(tmp_path, small_chunks, monkeypatch):
    url = str(tmp_path / "remote")
    store, needed = _scene(tmp_path, url)
    store.close()
    monkeypatch.setattr(remote_leases, "GC_LEASE", remote_leases.LEASE_MARGIN)  # expired as soon as it begins
    report = gc_remote(Remote(url), grace=0)
    assert report.stopped and report.chunks_removed == 0 and report.versions_removed == 0
    assert needed <= set(Remote(url).chunk_sizes()) and not list(Remote(url).backend.list("gc"))


def test_a_gc_marker_dated_in_the_future_stops_the_push_with_a_clear_error(tmp_path, small_chunks, monkeypatch):
    url = str(tmp_path / "remote")
    store, needed = _scene(tmp_path, url)
    with store:
        remote = Remote(url)
        remote.backend.put("gc/" + "3" * 32, [b'{"format": "modelpress.gc"}'])
        _age(tmp_path / "remote" / "gc" / ("3" * 32), -86400.0)  # a hostile (or broken) clock: never stale
        monkeypatch.setattr(remote_leases, "_POLL", 0.01)
        monkeypatch.setattr(remote_leases, "GC_LEASE", 0.2)
        monkeypatch.setattr(remote_leases, "LEASE_MARGIN", 0.1)
        with pytest.raises(StoreError, match="longer than a gc may run"):
            push(store, remote, "b")
        assert remote.refs("b") == {}  # nothing of the push is visible
        remote.backend.delete("gc/" + "3" * 32)
        assert push(store, remote, "b").chunks_skipped == len(needed)
        _check_clean(url, store, needed)


def test_a_push_slower_than_its_marker_lasts_announces_itself_again(tmp_path, small_chunks, monkeypatch):
    """A marker protects for PUSH_LEASE; a push still running near its end writes a new one and lists again
    before it moves a ref (here the lease is half a second and the upload takes longer)."""
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "s") as store:
        vid = store.put(_state(), "m")
        monkeypatch.setattr(remote_leases, "PUSH_LEASE", remote_leases.LEASE_MARGIN + 0.5)
        backend = Counting(Remote(url).backend, delay=0.1)
        remote = Remote(url, backend=backend, threads=1)
        report = push(store, remote, "m")
        markers = [k for k in backend.puts if k.startswith("pushes/")]
        assert len(markers) >= 2  # announced again at least once
        sent = [k for k in backend.puts if k.startswith("chunks/")]
        assert len(sent) == len(set(sent)) == report.chunks_sent == len(store._chunks_of(store.version("m")))
        assert Remote(url).resolve("m") == vid and verify_remote(Remote(url)).ok
        assert not list(Remote(url).backend.list("pushes"))  # every marker it wrote is gone
