"""Fixtures for the store tests: a fresh store per test, small chunks, a fixed seed."""

from __future__ import annotations

import functools

import pytest
import torch

from modelpress.store import Store, layout

_SPLIT_ROWS = layout.split_rows


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def store(tmp_path):
    with Store.init(tmp_path / "store") as s:
        yield s


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 KiB (or `small_chunks(n)`); patching CHUNK_BYTES would not do, split_rows binds it at import."""

    def use(target: int = 2048) -> None:
        monkeypatch.setattr(layout, "split_rows", functools.partial(_SPLIT_ROWS, target=target))
        monkeypatch.setattr(layout, "ALIGNED_CHUNK_BYTES", target)

    use()
    return use
