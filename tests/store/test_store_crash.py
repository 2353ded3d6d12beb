"""Crash safety: a writer SIGKILLed at each step of a commit leaves every earlier version byte-identical,
no partial version visible, a store that verifies, and leftovers that gc removes.

Each kill point gets its own copy of one seeded store; the writers run as processes forked from one
helper interpreter, all at once (see _store_support.py)."""

from __future__ import annotations

import functools
import shutil
import signal

import pytest

from _store_support import SMALL_CHUNK, assert_identical, chunk_files, run_forked, state
from modelpress.store import Store, layout

# (kill point, whether the new version is committed when the writer dies)
KILL_POINTS = [
    ("chunk-write:1", False),
    ("chunk-write:3", False),
    ("chunk-rename", False),
    ("before-transaction", False),
    ("insert-version", False),
    ("set-ref", False),
    ("after-commit", True),
    ("", True),  # no kill: the writer completes
]
CHUNKS_LEFT_BEHIND = ("chunk-write:1", "chunk-write:3", "before-transaction", "insert-version", "set-ref")


def folder(point: str) -> str:
    return point.replace(":", "-") or "no-kill"


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """The base folder (a store per kill point, plus `leftover`, killed at set-ref), every writer's exit code,
    the seed's versions {id: step} and its chunk files."""
    base = tmp_path_factory.mktemp("crash")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout, "split_rows", functools.partial(layout.split_rows, target=SMALL_CHUNK))
        with Store.init(base / "seed") as s:
            versions = {s.put(state("m", step), "m", message=f"step {step}"): step for step in (0, 1)}
    pairs = {folder(p): p for p, _ in KILL_POINTS} | {"leftover": "set-ref"}
    for name in pairs:
        shutil.copytree(base / "seed", base / name)
    codes = run_forked("crash", base, *(f"{d}={p}" for d, p in pairs.items()))
    return base, codes, versions, chunk_files(base / "seed")


def _check_committed(s: Store, versions: dict[str, int]) -> None:
    for vid, step in versions.items():
        assert_identical(s.get("m", vid), state("m", step))


@pytest.mark.parametrize("point, lands", KILL_POINTS, ids=[folder(p) for p, _ in KILL_POINTS])
def test_writer_killed_during_commit_leaves_no_partial_version(crashed, point, lands):
    base, codes, versions, seed_chunks = crashed
    root = base / folder(point)
    assert codes[folder(point)] == (-signal.SIGKILL if point else 0)
    with Store(root) as s:
        log = s.log("m")
        if lands:
            assert [v.id for v in log[1:]] == list(reversed(versions)) and s.resolve("m") == log[0].id
            assert (log[0].parent, log[0].message) == (log[1].id, "step 2")
            assert_identical(s.get("m"), state("m", 2))
        else:
            assert [v.id for v in log] == list(reversed(versions)) and s.resolve("m") == log[0].id
            assert s.models() == [("m", 2)]
        _check_committed(s, versions)
        assert s.verify().ok

        orphans = chunk_files(root) - set(s.catalog.all_chunk_ids())
        assert bool(orphans) == (point in CHUNKS_LEFT_BEHIND)  # the kill really hit mid-commit
        report = s.gc()
        assert report.chunks_removed == len(orphans)
        assert report.temporaries_removed == (1 if point == "chunk-rename" else 0)
        assert list((root / "tmp").iterdir()) == []
        assert chunk_files(root) == set(s.catalog.all_chunk_ids()) >= seed_chunks
        assert s.verify().ok
        _check_committed(s, versions)

        retried = s.put(state("m", 2), "m", message="step 2 again")  # the commit can simply be run again
        assert_identical(s.get("m", retried), state("m", 2))
        _check_committed(s, versions)
        assert s.verify().ok


def test_a_commit_after_a_killed_writer_without_gc_reads_back(crashed):
    """The killed writer's chunk files (xor deltas) stay until gc; a new version of the same content that is
    encoded differently (no parent: no deltas) must still read back, and verify."""
    base, codes, versions, _ = crashed
    root = base / "leftover"
    assert codes["leftover"] == -signal.SIGKILL
    with Store(root) as s:
        leftovers = chunk_files(root) - set(s.catalog.all_chunk_ids())
        assert {_stored_codec(root, c) for c in leftovers} >= {"xor"}
        vid = s.put(state("m", 2), "copy", parent=None)
        assert_identical(s.get("copy", vid), state("m", 2))
        assert s.verify().ok
        _check_committed(s, versions)


def _stored_codec(root, cid: str) -> str:
    from modelpress.store.objects import read_chunk

    return read_chunk(root, cid)[0].codec
