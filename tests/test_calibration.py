"""Calibration capture: statistics equal the ones computed directly from hooked full forwards,
padding never counts, the block walk feeds each block the processed previous block's output,
and malformed calibration data fails with one line naming the fix."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from modelpress.calibration import (
    LayerStats,
    calibration_sentences,
    find_blocks,
    prepare_batches,
    real_tokens,
    run_blockwise,
)
from modelpress.errors import CalibrationError


@dataclass
class T:
    """A target as passes see it: a module name (and, for passes, a module and config)."""

    name: str
    module: Any = None
    config: Any = None


class Block(nn.Module):
    """Attention (q, k, v read one input; o) and an MLP (up, down), called with a keyword mask."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h, attention_mask=None):  # (B, T, d), additive (B, 1, T)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5 + attention_mask
        h = self.norm(h + self.o(scores.softmax(-1) @ self.v(h)))
        return h + self.down(torch.relu(self.up(h)))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.unused = nn.Linear(d, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])  # shorter: not the blocks

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        additive = (1.0 - attention_mask[:, None, :].float()) * -1e9
        for layer in self.layers:
            h = layer(h, attention_mask=additive)
        return self.pooler(h[:, 0])


BLOCK_LINEARS = ["q", "k", "v", "o", "up", "down"]
ALL = [f"layers.{i}.{n}" for i in range(3) for n in BLOCK_LINEARS] + ["pooler"]


def make_batches(n: int = 3, seed: int = 0, width: int = 10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (3, width), generator=g)
        mask = torch.ones(3, width, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def direct_stats(model, names, batches):
    """Each layer's real-token inputs from plain hooked full forwards, as X (N, C)."""
    xs = {n: [] for n in names}
    handles = []
    current = {}
    for n in names:
        def hook(module, args, n=n):
            xs[n].append(real_tokens(args[0], current["mask"]))

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat(x).double() for n, x in xs.items() if x}


def collect(model, names, calibration, **kwargs):
    """run_blockwise with a process that only records what it is given."""
    seen: dict[str, LayerStats] = {}
    order: list[list[str]] = []
    log: list[str] = []

    def process(group):
        order.append([t.name for t, _ in group])
        for t, stats in group:
            seen[t.name] = stats

    run_blockwise(model, [T(n) for n in names], calibration, process, log, **kwargs)
    return seen, order, log


def assert_stats_match(stats: LayerStats, X: torch.Tensor):
    assert stats.tokens == len(X)
    assert stats.hessian.dtype == torch.float32
    torch.testing.assert_close(stats.hessian.double(), X.T @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.mean_abs, X.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.abs_max.double(), X.abs().amax(0), rtol=1e-6, atol=1e-7)


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


# ---------------------------------------------------------------- inputs


class FakeEncoder(nn.Module):
    """A model with `tokenize`, like SentenceEncoder: one token per word, padded to the batch."""

    def __init__(self):
        super().__init__()
        self.inner = TinyTransformer()
        self.seen: list[list[str]] = []

    def tokenize(self, sentences):
        self.seen.append(list(sentences))
        width = max(len(s.split()) for s in sentences)
        ids = torch.zeros(len(sentences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(sentences):
            words = s.split()
            ids[r, :len(words)] = torch.tensor([1 + sum(map(ord, w)) % 49 for w in words])
            mask[r, :len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids, attention_mask)


def test_sentences_are_tokenised_in_length_sorted_batches():
    model = FakeEncoder()
    sentences = [" ".join(["w"] * k) for k in (5, 1, 3, 2, 4)]
    batches = prepare_batches(model, sentences, batch_size=2)
    assert [len(b.token_mask) for b in batches] == [2, 2, 1]
    assert model.seen == [["w", "w w"], ["w w w", "w w w w"], ["w w w w w"]]
    seen, _, _ = collect(model, ["inner.layers.0.q"], sentences)
    assert seen["inner.layers.0.q"].tokens == 15


@pytest.mark.slow
def test_calibration_sentences_are_disjoint_from_evaluation_sentences():
    from modelpress.data.corpus import corpus_splits, stdlib_sentences

    sentences = calibration_sentences(64)
    assert len(sentences) == len(set(sentences)) == 64
    assert sentences == calibration_sentences(64)  # deterministic
    assert not set(sentences) & set(corpus_splits(n_eval=5000, n_calib=1).evaluation)
    assert set(calibration_sentences(8)) <= set(stdlib_sentences())
    assert calibration_sentences(8, seed=1) != calibration_sentences(8)


@pytest.mark.slow  # reads the corpus size: parses the whole stdlib
@pytest.mark.parametrize("n", [0, -1, 10**7])
def test_calibration_sentences_refuses_impossible_counts(n):
    with pytest.raises(CalibrationError, match=r"ask for between 1 and \d+ sentences"):
        calibration_sentences(n)


# ---------------------------------------------------------------- errors


def _error(model, names, calibration) -> str:
    with pytest.raises(CalibrationError) as info:
        collect(model, names, calibration)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("calibration", [[], (), iter([])])
def test_empty_calibration_set(calibration):
    assert "the calibration set is empty" in _error(TinyTransformer(), ["pooler"], calibration)


def test_missing_calibration_names_the_pass_and_the_fix():
    message = _error(TinyTransformer(), ["pooler"], None)
    assert "pass 'calibration' needs calibration data" in message and "--calibration 128" in message


@pytest.mark.parametrize(
    "calibration, fragment",
    [
        ("one sentence", "give a list of sentences"),
        (42, "calibration of type int is not supported"),
        ([{"input_ids": [[1, 2]]}], "entry 'input_ids' is a list, not a tensor"),
        ([3.5], "calibration item 0 is a float"),
        (["a sentence", torch.zeros(1, 3, dtype=torch.long)], "mixes"),
        (["a sentence"], "need a model with a tokenizer"),
        ([{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)}],
         "attention_mask has shape (2, 4) but input_ids (2, 5)"),
        ([{"input_ids": torch.zeros(2, 0, dtype=torch.long), "attention_mask": torch.ones(2, 0)}], "empty tensor"),
    ],
)
def test_malformed_calibration_data(calibration, fragment):
    assert fragment in _error(TinyTransformer(), ["pooler"], calibration)


def test_inputs_of_the_wrong_shape():
    model = nn.Sequential(nn.Linear(8, 4))
    message = _error(model, ["0"], [torch.randn(3, 8), torch.randn(3, 5)])
    assert "calibration batch 1 does not fit the model (RuntimeError" in message
    assert "give inputs shaped as the model's forward expects" in message


def test_wrong_shapes_in_a_transformer_fail_before_any_block_is_processed():
    model = TinyTransformer()
    processed = []
    bad = {"input_ids": torch.zeros(2, 3, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3, 4)}
    with pytest.raises(CalibrationError, match="does not fit the model|attention_mask has shape"):
        run_blockwise(model, [T(n) for n in ALL], [bad], lambda g: processed.append(g), [])
    assert processed == []


def test_nan_inputs():
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    assert "calibration batch 1 holds NaN or infinite values" in _error(model, ["0"], [torch.randn(2, 8), x])


def test_nan_activations_name_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    message = _error(model, ["0", "1"], [torch.randn(3, 8)])
    assert "the input of layer '1' holds NaN or infinite values on calibration batch 0" in message


def test_non_linear_targets_are_refused():
    model = nn.Sequential(nn.Conv1d(2, 2, 1))
    assert "is not a Linear layer" in _error(model, ["0"], [torch.randn(1, 2, 4)])


def test_a_batch_that_fails_inside_a_block_names_the_batch():
    # the catcher stops before block 0 runs, so this batch first fails in the block walk
    model = TinyTransformer()
    good = make_batches(1)[0]
    good = {"ids": good["input_ids"], "mask": good["attention_mask"]}  # names the checks do not know
    bad = {"ids": good["ids"][:, :6], "mask": good["mask"]}  # (3, 6) tokens, (3, 10) mask

    class Loose(nn.Module):  # does not check the mask itself, so the block does
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, mask):
            h = self.inner.embed(ids)
            additive = (1.0 - mask[:, None, :].float()) * -1e9
            for layer in self.inner.layers:
                h = layer(h, attention_mask=additive)
            return h

    names = [f"inner.layers.0.{n}" for n in BLOCK_LINEARS]
    with pytest.raises(CalibrationError, match=r"calibration batch 1 does not fit the model \(RuntimeError"):
        run_blockwise(Loose(), [T(n) for n in names], [good, bad], lambda g: None, [])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_free_memory_is_handed_back_between_blocks():
    """After a block, freed heap pages go back to the system: resident memory drops once 64 MB of small
    allocations (heap, not mmap) are freed and trimmed."""
    import ctypes

    from modelpress.calibration import _malloc_trim, release_free_memory

    assert _malloc_trim() is not None  # glibc found

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
