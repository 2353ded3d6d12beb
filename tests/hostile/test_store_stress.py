"""The stress test of issue 12: for 60 seconds, 4 loader processes, 1 process putting versions and 1 running gc
(with no grace period, so only the store's lock and its rules protect the others) on one store. No process
may meet any exception, handled or not; afterwards every acknowledged version reads back byte-identical and
the store verifies clean. What it asserts does not depend on how much each process got done in the time
(at least one operation each)."""

from __future__ import annotations

import pytest

from _store_hostile import check_stress, make_seed, small_chunks, stress

SECONDS = 60


@pytest.mark.slow
def test_four_loaders_a_writer_and_gc_for_a_minute(tmp_path, monkeypatch):
    small_chunks(monkeypatch)
    seed = make_seed(tmp_path / "store")
    reports = stress(seed.root, SECONDS, tmp_path)
    check_stress(seed.root, reports, seed.versions)
    print({role: report["done"] for role, report in reports.items()})
