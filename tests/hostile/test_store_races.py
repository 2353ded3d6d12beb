"""Readers never race gc: loads, gets, puts and gc run at once from several processes and none of them meets
an error, every version stays whole; gc waits for a running put (the store's lock), keeps unknown files
younger than its grace period, and works on a store with missing sub-folders. (The 60-second version of the
race is test_store_stress.py.)"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from _store_hostile import (
    check_stress,
    chunk_files,
    copy_store,
    make_seed,
    small_chunks,
    state,
    stress,
    victim,  # noqa: F401  (the fixture)
)
from modelpress import fileio
from modelpress.codecs import Raw
from modelpress.store import Store
from modelpress.store.objects import ChunkHeader, chunk_id, chunk_key


@pytest.mark.slow  # six processes racing: runs in make test, not test-fast
def test_loads_puts_and_gc_in_six_processes_for_a_few_seconds(tmp_path, monkeypatch):
    small_chunks(monkeypatch)
    seed = make_seed(tmp_path / "store")
    reports = stress(seed.root, 6, tmp_path)
    check_stress(seed.root, reports, seed.versions)


def test_gc_waits_for_a_put_in_progress(victim):
    """A writer holds the store's lock (shared) while it writes chunks; gc takes it alone, so it runs after."""
    released = []

    def writer():
        with fileio.locked(victim.root / "lock", exclusive=False):
            time.sleep(0.5)
            released.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.1)
    with Store(victim.root) as s:
        s.gc(grace=0)
        finished = time.monotonic()
    thread.join()
    assert released and finished >= released[0]
    victim.intact()


def _orphan(s: Store, text: str) -> str:
    raw = text.encode() * 40
    cid = chunk_id(raw)
    s.backend.put_if_absent(chunk_key(cid), [ChunkHeader(Raw(), len(raw)).head(), raw])
    return cid


def test_gc_keeps_files_younger_than_its_grace_period(victim):
    with Store(victim.root) as s:
        old, young = _orphan(s, "old"), _orphan(s, "young")
        past = time.time() - 7200
        os.utime(victim.root / chunk_key(old), (past, past))
        (victim.root / "tmp" / "old.part").write_bytes(b"x")
        os.utime(victim.root / "tmp" / "old.part", (past, past))
        (victim.root / "tmp" / "young.part").write_bytes(b"x")
        report = s.gc()  # the default grace: an hour
        assert (report.chunks_removed, report.temporaries_removed, report.kept_young) == (1, 1, 1)
        assert young in chunk_files(victim.root) and old not in chunk_files(victim.root)
        assert [p.name for p in (victim.root / "tmp").iterdir()] == ["young.part"]
        assert s.gc(grace=0).chunks_removed == 1
    victim.intact()


@pytest.mark.parametrize("missing", ["tmp", "chunks", "cache", "lock"])
def test_gc_works_with_a_sub_folder_missing(victim, missing):
    path = victim.root / missing
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    with Store(victim.root) as s:
        s.gc(grace=0)
        if missing != "chunks":
            s.put({"t": torch.arange(3)}, "t")
    if missing != "chunks":
        victim.intact()


def test_readers_keep_reading_while_gc_removes_what_they_do_not_use(victim, tmp_path, monkeypatch):
    """In one process: a thread loads in a loop while gc removes hundreds of orphans and temporaries."""
    with Store(victim.root) as s:
        for i in range(200):
            _orphan(s, f"orphan {i}")
            (victim.root / "tmp" / f"t{i}.part").write_bytes(b"x")
    failures, stop = [], threading.Event()

    def reader():
        with Store(victim.root) as s:
            while not stop.is_set():
                try:
                    s.get("m")
                    s.load("enc")
                except BaseException as exc:  # reported below
                    failures.append(exc)
                    return

    thread = threading.Thread(target=reader)
    thread.start()
    with Store(victim.root) as s:
        removed = s.gc(grace=0)
    stop.set()
    thread.join()
    assert not failures and removed.chunks_removed == 200 and removed.temporaries_removed == 200
    victim.intact()
