"""The calibration walk: statistics equal the ones computed directly from hooked full forwards, padding never
counts, each block sees the processed previous block's output, and memory goes back between blocks."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from modelpress.calibration import LayerStats, find_blocks, run_blockwise
from _calibration_support import (  # noqa: E402
    ALL, BLOCK_LINEARS, T, TinyTransformer, assert_stats_match, collect, direct_stats, make_batches)


# ---------------------------------------------------------------- statistics


def test_hessian_is_xtx_of_a_hooked_forward_without_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [torch.randn(5, 8), torch.randn(7, 8)]
    seen, order, log = collect(model, ["0", "2"], data)
    X0 = torch.cat(data).double()
    assert_stats_match(seen["0"], X0)
    with torch.no_grad():
        X2 = torch.cat([torch.relu(model[0](x)) for x in data]).double()
    assert_stats_match(seen["2"], X2)
    assert order == [["0"], ["2"]] and log == []


@pytest.mark.parametrize("sequential", [True, False])
def test_blockwise_stats_equal_full_forward_stats(sequential):
    model, data = TinyTransformer(), make_batches()
    seen, order, log = collect(model, ALL, data, sequential=sequential)
    expected = direct_stats(model, ALL, data)
    for name in ALL:
        assert_stats_match(seen[name], expected[name])
    # execution order, with q/k/v (one shared input) handed over together
    assert order[:4] == [["layers.0.q", "layers.0.k", "layers.0.v"], ["layers.0.o"], ["layers.0.up"],
                         ["layers.0.down"]]
    assert order[-1] == ["pooler"]
    assert seen["layers.1.q"] is seen["layers.1.v"]  # one statistic per shared input


def test_padded_tokens_are_excluded():
    model = TinyTransformer()
    padded = make_batches(1)[0]
    seen, _, _ = collect(model, ALL, [padded])
    rows = []
    for r in range(3):  # each sequence alone, without padding
        keep = padded["attention_mask"][r].bool()
        rows.append({"input_ids": padded["input_ids"][r, keep][None],
                     "attention_mask": padded["attention_mask"][r, keep][None]})
    alone, _, _ = collect(model, ALL, rows)
    for name in ALL:
        assert seen[name].tokens == alone[name].tokens
        torch.testing.assert_close(seen[name].hessian, alone[name].hessian, rtol=1e-4, atol=1e-4)
    assert seen["layers.0.q"].tokens == int(padded["attention_mask"].sum())
    assert seen["pooler"].tokens == 3  # (B, C) input: one row per sequence


def test_stats_see_the_processed_earlier_layers_and_blocks():
    # with each layer rewritten right after it is measured, every layer's statistics are those of
    # a full forward through the final model: earlier layers and blocks were already rewritten
    model, data = TinyTransformer(), make_batches()
    seen: dict[str, LayerStats] = {}

    def process(group):
        for t, stats in group:
            seen[t.name] = stats
            layer = model.get_submodule(t.name)
            layer.weight.data = torch.round(layer.weight.data * 4) / 4

    run_blockwise(model, [T(n) for n in ALL], data, process, [])
    expected = direct_stats(model, ALL, data)
    for name in ALL:
        assert_stats_match(seen[name], expected[name])


def test_blocks_run_one_at_a_time_and_the_model_forward_stops_at_the_first():
    model, data = TinyTransformer(), make_batches(4)
    calls = {"pooler": 0, 0: 0, 1: 0, 2: 0}
    model.pooler.register_forward_pre_hook(lambda *a: calls.__setitem__("pooler", calls["pooler"] + 1))
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    names = [f"layers.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS]  # only blocks 0 and 1
    run_blockwise(model, [T(n) for n in names], data, lambda group: None, [])
    assert calls["pooler"] == 1  # one full forward only, to check that the blocks chain
    assert calls[2] == 1  # block 2 holds no target: never walked
    # chain check, the catcher (4 batches), probe (batch 0), 4 groups x 4 batches, re-run for block 1's
    # inputs; none after block 1
    assert calls[0] == 1 + 4 + 1 + 16 + 4
    assert calls[1] == 1 + 1 + 16


def test_layers_no_token_reaches_are_skipped_and_logged():
    model, data = TinyTransformer(), make_batches()
    seen, _, log = collect(model, ["unused", "layers.1.q", "pooler"], data)
    assert "unused" not in seen
    assert log == ["unused: skipped by calibration: no calibration token reached it, it stays float"]


def test_parallel_module_lists_are_measured_with_whole_model_forwards():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.heads = nn.ModuleList(nn.Sequential(nn.Linear(6, 3)) for _ in range(3))

        def forward(self, x):
            return torch.cat([h(x) for h in self.heads], -1)

    model, data = Heads(), [torch.randn(4, 6), torch.randn(2, 6)]
    names = ["heads.0.0", "heads.1.0", "heads.2.0"]
    seen, _, log = collect(model, names, data)
    assert "do not form a chain" in log[0]
    for name in names:
        assert_stats_match(seen[name], torch.cat(data).double())


def test_training_mode_is_restored_and_dropout_is_off_while_measuring():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8)).train()
    data = [torch.randn(64, 8)]
    seen, _, _ = collect(model, ["1"], data)
    assert_stats_match(seen["1"], data[0].double())
    assert model.training and model[0].training


def test_find_blocks_picks_the_longest_list_of_same_type_modules():
    name, blocks = find_blocks(TinyTransformer())
    assert name == "layers" and len(blocks) == 3
    assert find_blocks(nn.Sequential(nn.Linear(2, 2))) is None
    mixed = nn.Module()
    mixed.parts = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)])
    assert find_blocks(mixed) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_free_memory_is_handed_back_between_blocks():
    """After a block, freed heap pages go back to the system: resident memory drops once 64 MB of small
    allocations (heap, not mmap) are freed and trimmed."""
    import ctypes

    from modelpress import _libc
    from modelpress.calibration import release_free_memory

    assert getattr(_libc.libc(), "malloc_trim", None) is not None  # glibc found

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(1024)]  # 64 KiB each: below the mmap threshold
    for p in blocks:
        ctypes.memset(p, 1, 64 << 10)
    for p in blocks[:-1]:  # the last one pins the heap top, so only an in-heap trim can release the rest
        libc.free(p)
    before = rss_mb()
    release_free_memory()
    after = rss_mb()
    libc.free(blocks[-1])
    assert before - after > 32
