"""kill -9 at every fault point of a put and of a gc, and torn writes: every version acknowledged before the
crash reads back byte-identical, the store verifies clean, no partial version is ever visible, and gc
then removes exactly what the dead process left behind.

A fault point (modelpress.fileio.fault_point) precedes every file creation, write, fsync, link, rename,
unlink, folder creation and catalogue COMMIT. Each operation is traced once in this process to learn its
fault points; then, for every N, a process forked from one helper interpreter (see _store_support.py)
runs it on its own copy of a seeded store and SIGKILLs itself just before the Nth point.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from _store_hostile import (
    assert_identical,
    chunk_files,
    copy_store,
    intact,
    make_seed,
    recorder,
    run_forked,
    small_chunks,
    state,
    traced_put,
)
from modelpress.codecs import Raw
from modelpress.fileio import inject_faults
from modelpress.store import Store
from modelpress.store.objects import ChunkHeader, chunk_id, chunk_key

pytestmark = pytest.mark.slow  # kills a child process at every fault point of a put and a gc: runs in make test, not test-fast


def folder(point: str) -> str:
    return point.replace(":", "-") or "no-kill"


def kill_index(point: str, ops: list) -> int | None:
    """The 1-based index of the fault point a process died at (None: it did not die inside the operation)."""
    kind, _, n = point.partition(":")
    if kind == "fault":
        return int(n)
    if kind == "torn":
        writes = [i for i, (op, _, data) in enumerate(ops, 1) if op == "write" and data]
        return writes[int(n) - 1]
    return None


def points(ops: list) -> list[str]:
    writes = sum(1 for op, _, data in ops if op == "write" and data)
    return ([f"fault:{n}" for n in range(1, len(ops) + 1)] + [f"torn:{n}" for n in range(1, writes + 1)]
            + ["after", ""])


# ---------------------------------------------------------------- put

@pytest.fixture(scope="module")
def put_crashes(tmp_path_factory):
    """A seeded store, the fault points of committing state("m", 2) to it, and a copy of the store per kill point
    after a process died there (with its exit code)."""
    base = tmp_path_factory.mktemp("put-crash")
    seed, ops = traced_put(base)
    assert sum(op == "link" for op, _, _ in ops) >= 4 and [op for op, _, _ in ops][-1] == "commit"
    for point in points(ops):
        copy_store(seed, base / folder(point))
    codes = run_forked("put", base, *(f"{folder(p)}={p}" for p in points(ops)))
    return seed, ops, codes


def test_every_fault_point_of_a_put_is_a_file_operation_or_the_commit(put_crashes):
    _, ops, _ = put_crashes
    assert {op for op, _, _ in ops} <= {"write", "fsync", "link", "fsync_dir", "mkdir", "commit"}
    assert sum(op == "commit" for op, _, _ in ops) == 1


def test_a_put_killed_at_any_fault_point_loses_nothing(put_crashes, monkeypatch):
    seed, ops, codes = put_crashes
    small_chunks(monkeypatch)
    commit = len(ops)  # the commit is the last fault point
    for point in points(ops):
        root = seed.root.parent / folder(point)
        assert codes[folder(point)] == (-signal.SIGKILL if point else 0), point
        died_at = kill_index(point, ops)
        landed = died_at is None
        with Store(root) as s:
            log = s.log("m")
            versions = dict(seed.versions)
            if landed:
                assert len(log) == 3 and log[0].message == "step 2" and s.resolve("m") == log[0].id, point
                versions[log[0].id] = 2
            else:
                assert [v.id for v in log] == list(reversed(seed.versions)), point  # no partial version
            linked_before = any(op == "link" for op, _, _ in ops[:died_at - 1]) if died_at else False
            orphans = chunk_files(root) - set(s.catalog.all_chunk_ids())
            assert bool(orphans) == (linked_before and died_at <= commit), point
        intact(root, versions)
        with Store(root) as s:
            report = s.gc(grace=0)
            assert report.chunks_removed == len(orphans), point
            assert list((root / "tmp").iterdir()) == [], point
            assert chunk_files(root) == set(s.catalog.all_chunk_ids()) >= chunk_files(seed.root), point
        intact(root, versions)
        with Store(root) as s:  # the commit can simply be run again
            again = s.put(state("m", 2), "m", message="step 2 again")
            assert_identical(s.get("m", again), state("m", 2))
        intact(root, versions)


def test_a_put_after_a_killed_one_checks_the_strays_it_finds(put_crashes, monkeypatch):
    """Without gc in between: the next put meets the dead process's chunk files at the paths of its own chunks
    and adopts them only once read back and checked; the new version reads back and verifies."""
    seed, ops, _ = put_crashes
    small_chunks(monkeypatch)
    commit = len(ops)
    for point in (f"fault:{commit}", f"fault:{commit // 2}"):
        root = seed.root.parent / folder(point)
        with Store(root) as s:
            if not chunk_files(root) - set(s.catalog.all_chunk_ids()):
                continue  # (already collected by the test above, which may have run first)
            vid = s.put(state("m", 2), "copy", parent=None)
            assert_identical(s.get("copy", vid), state("m", 2))
        intact(root, seed.versions)


# ---------------------------------------------------------------- gc

def _litter(seed_root: Path, to: Path) -> dict[str, int]:
    """A copy of the seed with everything gc removes: orphan chunk files, temporaries, an old cache/ folder,
    and a forgotten version (its catalogue rows deleted, so gc deletes rows too). Returns the versions kept."""
    with Store(seed_root) as seed:
        versions = {v.id: int(v.message.split()[1]) for v in seed.log("m")}
    shutil.copytree(seed_root, to)
    forgotten = min(versions, key=versions.get)
    with Store(to) as s:
        for i in range(3):
            raw = f"stray chunk {i}".encode() * 50
            s.backend.put_if_absent(chunk_key(chunk_id(raw)), [ChunkHeader(Raw(), len(raw)).head(), raw])
        (to / "tmp" / "x.part").write_bytes(b"partial")
        (to / "cache" / "abc").mkdir(parents=True)
        (to / "cache" / "abc" / "config.json").write_bytes(b"{}")
        with s.catalog.transaction() as catalog:
            for table, column in (("tensors", "version"), ("files", "version"), ("refs", "version"),
                                  ("versions", "id")):
                catalog.rows(f"DELETE FROM {table} WHERE {column}=?", (forgotten,))
            catalog.set_ref("m", "latest", max(versions, key=versions.get))
    return {v: n for v, n in versions.items() if v != forgotten}


@pytest.fixture(scope="module")
def gc_crashes(tmp_path_factory):
    base = tmp_path_factory.mktemp("gc-crash")
    with pytest.MonkeyPatch.context() as mp:
        small_chunks(mp)
        seed = make_seed(base / "seed")
    kept = _litter(seed.root, base / "littered")
    ops: list = []
    shutil.copytree(base / "littered", base / "trace")
    with Store(base / "trace") as s, inject_faults(recorder(ops)):
        s.gc(grace=0)
    assert [op for op, _, _ in ops].count("commit") == 1 and "unlink" in [op for op, _, _ in ops]
    for point in points(ops):
        shutil.copytree(base / "littered", base / folder(point))
    codes = run_forked("gc", base, *(f"{folder(p)}={p}" for p in points(ops)))
    return base, kept, ops, codes


def test_a_gc_killed_at_any_fault_point_loses_nothing(gc_crashes):
    base, kept, ops, codes = gc_crashes
    assert len(ops) >= 6  # the commit, 3 stray chunks and the forgotten version's, the temporary, the cache
    for point in points(ops):
        root = base / folder(point)
        assert codes[folder(point)] == (-signal.SIGKILL if point else 0), point
        intact(root, kept)
        with Store(root) as s:
            s.gc(grace=0)  # a second gc finishes the work
            assert chunk_files(root) == set(s.catalog.all_chunk_ids()), point
            assert s.catalog.referenced_chunks() == set(s.catalog.all_chunk_ids()), point
        assert list((root / "tmp").iterdir()) == [] and not (root / "cache").exists(), point
        intact(root, kept)
