"""What the store's hostile tests share: the store test helpers (tests/store/_store_support.py, put on the
path here so that both folders use one copy), a small seeded store, and checks that what was stored before
an attack is all still there."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

import torch

STORE_TESTS = Path(__file__).resolve().parent.parent / "store"
if str(STORE_TESTS) not in sys.path:
    sys.path.insert(0, str(STORE_TESTS))

from _store_support import (  # noqa: E402
    SMALL_CHUNK,
    assert_identical,
    bits,
    chunk_files,
    digest,
    recorder,
    run_forked,
    snapshot,
    state,
)
from modelpress.store import Store, layout  # noqa: E402

__all__ = ["SMALL_CHUNK", "assert_identical", "bits", "chunk_files", "digest", "recorder", "run_forked", "snapshot",
           "state", "Seed", "make_seed", "copy_store", "small_chunks", "intact"]


def small_chunks(monkeypatch) -> None:
    """Cut tensors at SMALL_CHUNK bytes (as the forked processes of _store_support do)."""
    monkeypatch.setattr(layout, "split_rows", functools.partial(layout.split_rows, target=SMALL_CHUNK))
    monkeypatch.setattr(layout, "ALIGNED_CHUNK_BYTES", SMALL_CHUNK)


class Seed:
    """A store holding two versions of model m (state("m", 0) and state("m", 1)) and what each must read back."""

    def __init__(self, root: Path, versions: dict[str, int]):
        self.root, self.versions = root, versions

    def expected(self) -> dict[str, dict[str, torch.Tensor]]:
        return {vid: state("m", step) for vid, step in self.versions.items()}


def make_seed(root: Path) -> Seed:
    with Store.init(root) as s:
        versions = {s.put(state("m", step), "m", message=f"step {step}"): step for step in (0, 1)}
    return Seed(root, versions)


def copy_store(seed: Seed, to: Path) -> Path:
    shutil.copytree(seed.root, to, symlinks=True)
    return to


def intact(root: Path, versions: dict[str, int], model: str = "m") -> None:
    """Every version still reads back byte-identical and the store verifies clean."""
    with Store(root) as s:
        for vid, step in versions.items():
            assert_identical(s.get(model, vid), state(model, step))
        report = s.verify()
        assert report.ok, report.problems
