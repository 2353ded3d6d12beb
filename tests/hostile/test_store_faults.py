"""Disk faults injected at each file operation of a put and a gc (modelpress.fileio's fault points): ENOSPC and
EIO on a write, an fsync, a link, a folder's fsync, a folder's creation, the catalogue COMMIT, and gc's
unlinks. Each time the operation fails with StorageIOError (one line, no traceback material), nothing is
committed, a failed fsync is never retried, every acknowledged version reads back byte-identical, the store
verifies clean, and the same operation then succeeds once the disk is well again."""

from __future__ import annotations

import errno
import os

import pytest

from _store_hostile import chunk_files, copy_store, intact, small_chunks, state, traced_put
from modelpress.errors import StorageIOError
from modelpress.fileio import inject_faults
from modelpress.store import Store
from modelpress.store.objects import chunk_key

pytestmark = pytest.mark.slow  # a disk fault at every write of a put: make test, not test-fast


def failing(target: str, code: int, nth: int, data: bool | None = None):
    """An injector raising OSError(code) at the nth fault point of kind `target` (only those carrying data, or
    only those not, when `data` says so); it records every point met after the failure in `.after`."""
    seen, state_ = [0], {"failed": None, "after": []}

    def injector(op, path, fd, payload):
        if state_["failed"] is not None:
            state_["after"].append((op, path))
        if op == target and (data is None or (payload is not None) == data):
            seen[0] += 1
            if seen[0] == nth:
                state_["failed"] = path
                raise OSError(code, os.strerror(code))

    injector.state = state_
    return injector


FAULTS = {  # name: (fault point, errno, only points with data?)
    "ENOSPC writing data": ("write", errno.ENOSPC, True),
    "EIO writing data": ("write", errno.EIO, True),
    "ENOSPC creating a file": ("write", errno.ENOSPC, False),
    "EIO on fsync": ("fsync", errno.EIO, None),
    "ENOSPC on fsync": ("fsync", errno.ENOSPC, None),
    "EIO linking a chunk into place": ("link", errno.EIO, None),
    "EIO on a folder's fsync": ("fsync_dir", errno.EIO, None),
    "ENOSPC creating a folder": ("mkdir", errno.ENOSPC, None),
    "EIO on the catalogue commit": ("commit", errno.EIO, None),
    "ENOSPC on the catalogue commit": ("commit", errno.ENOSPC, None),
}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A seeded store and the fault points of putting state("m", 2) into it."""
    return traced_put(tmp_path_factory.mktemp("faults"))


def _count(ops, target, data) -> int:
    return sum(1 for op, _, payload in ops if op == target and (data is None or payload == data))


@pytest.mark.parametrize("fault", FAULTS)
def test_a_put_that_meets_a_disk_fault_fails_cleanly_and_loses_nothing(seeded, tmp_path, monkeypatch, fault):
    seed, ops = seeded
    small_chunks(monkeypatch)
    target, code, data = FAULTS[fault]
    occurrences = _count(ops, target, data)
    assert occurrences >= 1
    for nth in range(1, occurrences + 1):
        root = copy_store(seed, tmp_path / f"{nth}")
        injector = failing(target, code, nth, data)
        with Store(root) as s:
            with inject_faults(injector):
                with pytest.raises(StorageIOError) as info:
                    s.put(state("m", 2), "m", message="step 2")
            assert "\n" not in str(info.value) and os.strerror(code) in str(info.value)
            assert [v.id for v in s.log("m")] == list(reversed(seed.versions))  # nothing committed
            if target == "fsync":  # never retried: the failed file is not fsynced (or written) again
                assert not [p for op, p in injector.state["after"] if p == injector.state["failed"]]
            assert list((root / "tmp").iterdir()) == []  # the failed temporary is gone
        intact(root, seed.versions)
        with Store(root) as s:
            vid = s.put(state("m", 2), "m", message="step 2")  # the disk is well again: the same put succeeds
        intact(root, {**seed.versions, vid: 2})


def _littered(seed, to):
    root = copy_store(seed, to)
    from modelpress.codecs import Raw
    from modelpress.store.objects import ChunkHeader, chunk_id

    with Store(root) as s:
        for i in range(3):
            raw = f"orphan {i}".encode() * 30
            s.backend.put_if_absent(chunk_key(chunk_id(raw)), [ChunkHeader(Raw(), len(raw)).head(), raw])
    (root / "tmp" / "x.part").write_bytes(b"partial")
    return root


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS], ids=["EIO", "EROFS"])
@pytest.mark.parametrize("nth", [1, 2, 4])
def test_a_gc_whose_unlink_fails_stops_cleanly_and_loses_nothing(seeded, tmp_path, code, nth):
    seed, _ = seeded
    root = _littered(seed, tmp_path / "store")
    with Store(root) as s:
        with inject_faults(failing("unlink", code, nth)):
            with pytest.raises(StorageIOError, match=os.strerror(code)):
                s.gc(grace=0)
    intact(root, seed.versions)
    with Store(root) as s:
        s.gc(grace=0)
        assert chunk_files(root) == set(s.catalog.all_chunk_ids()) and list((root / "tmp").iterdir()) == []
    intact(root, seed.versions)


def test_a_gc_whose_catalogue_commit_fails_removes_nothing(seeded, tmp_path):
    seed, _ = seeded
    root = _littered(seed, tmp_path / "store")
    with Store(root) as s:  # a forgotten version makes gc delete catalogue rows, hence commit
        forgotten = s.log("m")[-1].id
        with s.catalog.transaction() as catalog:
            for table, column in (("tensors", "version"), ("files", "version"), ("refs", "version"),
                                  ("versions", "id")):
                catalog.rows(f"DELETE FROM {table} WHERE {column}=?", (forgotten,))
            catalog.set_ref("m", "latest", s.log("m")[0].id)
        rows, files = set(s.catalog.all_chunk_ids()), chunk_files(root)
        with inject_faults(failing("commit", errno.EIO, 1)):
            with pytest.raises(StorageIOError):
                s.gc(grace=0)
        assert set(s.catalog.all_chunk_ids()) == rows and chunk_files(root) == files
    kept = {v: n for v, n in seed.versions.items() if v != forgotten}
    intact(root, kept)
