"""Four processes committing 25 versions each to one store end with all 100 versions intact."""

from __future__ import annotations

import json

import pytest

from _store_support import digest, run_forked
from modelpress.store import Store

pytestmark = pytest.mark.slow  # several writer processes: runs in make test, not test-fast
WRITERS, VERSIONS = 4, 25


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A store that WRITERS processes filled at once, and {version id: what its writer put}."""
    base = tmp_path_factory.mktemp("concurrent")
    with Store.init(base / "store"):
        pass
    assert run_forked("writers", base / "store", WRITERS, VERSIONS, base) == {str(i): 0 for i in range(WRITERS)}
    put = {}
    for i in range(WRITERS):
        mine = json.loads((base / f"writer{i}.json").read_text())
        assert len(mine) == VERSIONS
        assert not set(mine) & set(put)
        put.update(mine)
    return base / "store", put


def test_every_version_of_every_writer_is_there(written):
    root, put = written
    with Store(root) as s:
        assert len(put) == WRITERS * VERSIONS
        assert s.models() == [("model0", 2 * VERSIONS), ("model1", 2 * VERSIONS)]
        logged = {v.id: v for model in ("model0", "model1") for v in s.log(model)}
        assert set(logged) == set(put)
        assert all(logged[vid].model == info["model"] for vid, info in put.items())
        assert {s.resolve(m) for m in ("model0", "model1")} <= set(put)


def test_every_version_reads_back_bit_identical(written):
    root, put = written
    with Store(root) as s:
        for vid, info in put.items():
            got = s.get(info["model"], vid)
            assert {name: digest(t) for name, t in got.items()} == info["tensors"], vid


def test_store_verifies_and_shared_tensors_are_stored_once(written):
    root, put = written
    with Store(root) as s:
        report = s.verify()
        assert report.ok and report.checked == len(s.catalog.all_chunk_ids())
        assert s.gc().chunks_removed == 0  # no writer left an orphan behind
        tables = {info["tensors"]["shared.table"][2] for info in put.values()}
        assert len(tables) == 1
        shared = {t.chunks for vid, info in put.items() for t in s.catalog.tensors(vid) if t.name == "shared.table"}
        assert len(shared) == 1


def test_versions_chain_to_parents_of_their_own_model(written):
    root, put = written
    with Store(root) as s:
        for model in ("model0", "model1"):
            log = s.log(model)
            ids = {v.id for v in log}
            assert 1 <= sum(v.parent is None for v in log) <= 2  # two writers may both start with no `latest`
            assert all(v.parent in ids for v in log if v.parent is not None)

