"""The streaming ring on its own: units of several sizes cycled through a ring smaller than their sum (so
that it wraps), each acquired tensor equal to the stored one, prefetching after the first pass, and a
change of order learned again."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.regions.ring import Ring, Unit
from modelpress.store import Store, layout


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(rows, 16, generator=g) for i, rows in enumerate((40, 7, 64, 23, 31))}
    store = Store.init(tmp_path_factory.mktemp("ring") / "store")
    store.put(tensors, "t", chunk_bytes={"*": 1024})
    version = store.version("t")
    rows = store.catalog.chunks([c for t in version.tensors for c in t.chunks])
    units = [Unit(t.name, t.dtype, t.shape, 0, tuple(rows[c] for c in t.chunks)) for t in version.tensors]
    yield store, tensors, units
    store.close()


def use(ring: Ring, index: int) -> torch.Tensor:
    view = ring.acquire(index)
    try:
        return view.clone()
    finally:
        ring.release(index)


@pytest.mark.parametrize("readers", [1, 2])
@pytest.mark.parametrize("slack", [0, 3000, 100000])
def test_units_cycle_through_a_ring_that_wraps(stored, readers, slack):
    store, tensors, units = stored
    capacity = 2 * max(layout.aligned(u.nbytes) for u in units) + slack
    with_ring = Ring(store.reader, units, capacity, readers=readers)
    try:
        for _ in range(4):
            for i, unit in enumerate(units):
                assert torch.equal(use(with_ring, i), tensors[unit.tensor])
        assert with_ring._cycle == tuple(range(len(units))) and with_ring.relearned == 0
        assert with_ring.bytes_landed >= 4 * sum(u.nbytes for u in units)
    finally:
        with_ring.close()


def test_another_order_is_learned_again(stored):
    store, tensors, units = stored
    ring = Ring(store.reader, units, 2 * max(layout.aligned(u.nbytes) for u in units))
    try:
        for order in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 3, 1], [0, 3, 1], [0, 3, 1], [4, 2]):
            for i in order:
                assert torch.equal(use(ring, i), tensors[units[i].tensor])
        assert ring.relearned >= 1
    finally:
        ring.close()


def test_a_unit_larger_than_the_ring_is_refused(stored):
    store, _, units = stored
    with pytest.raises(ConfigError, match="cannot hold"):
        Ring(store.reader, units, 64)


def test_units_are_used_one_at_a_time(stored):
    store, _, units = stored
    ring = Ring(store.reader, units, 4 * max(layout.aligned(u.nbytes) for u in units), prefetch=False)
    ring.acquire(0)
    with pytest.raises(ConfigError, match="still held"):
        ring.acquire(1)
    with pytest.raises(ConfigError, match="not the one held"):
        ring.release(1)
    ring.release(0)
    ring.close()
