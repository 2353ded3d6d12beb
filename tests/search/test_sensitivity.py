"""Per-layer sensitivity and mixed precision, on a toy sentence encoder with one layer made sensitive.

Every measured number is checked against a plain computation: the same layer compressed alone by
`compress` on a fresh copy, run as a whole forward, scored by `fidelity`.
"""

from __future__ import annotations

import copy
import fnmatch
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modelpress.compress import compress
from modelpress.encodings import QuantScheme
from modelpress.errors import ConfigError, RecipeError
from modelpress.evaluate.fidelity import fidelity
from modelpress.encodings import RangeSearch, quantize_weight
from modelpress.passes.quantize import RTNConfig
from modelpress.recipe import Recipe, Selector, Stage
from modelpress.data.batches import tokenised_batches
from modelpress.search import (
    LayerSensitivity,
    Measurement,
    default_upgrades,
    layer_sensitivity,
    mixed_precision_recipe,
    plan_mixed_precision,
)
from modelpress.search.overrides import exact_pattern
from modelpress.search.replay import Runner

SENSITIVE = "blocks.1.down"
WORDS = ("model", "weights", "layer", "store", "quantise", "group", "scale", "zero", "token", "batch",
         "sentence", "cosine", "table", "kernel", "prune", "rank", "block", "cache", "float", "bytes")


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))


class ToyEncoder(nn.Module):
    """A sentence encoder in miniature: word ids -> embedding -> 3 residual MLP blocks -> mean -> head."""

    def __init__(self, vocab: int = 97, dim: int = 32, hidden: int = 64, blocks: int = 3):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(blocks))
        self.head = nn.Linear(dim, dim)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        ids = [[sum(map(ord, w)) % (self.vocab - 1) + 1 for w in s.split()] for s in sentences]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])  # (B, T)
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        return self.head((h * mask).sum(1) / mask.sum(1))  # (B, C)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy's matrices are tiny: on a shared machine a second thread only adds waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def toy_encoder() -> ToyEncoder:
    """The toy with SENSITIVE made sensitive: its weights scaled up 3x (block 1 dominates the embedding),
    and one huge weight in every group of 16 on an input that is always ~0 (a hidden unit that GELU
    turns off). The huge weights change nothing in float, but a 4-bit group must spend its range on
    them, so the weights that matter are rounded away."""
    torch.manual_seed(0)
    model = ToyEncoder().eval()
    up, down = model.blocks[1].up, model.blocks[1].down
    dead = slice(0, 64, 16)
    with torch.no_grad():
        up.weight[dead], up.bias[dead] = 0.0, -10.0  # GELU(-10) ~ -8e-23
        down.weight.mul_(3.0)
        down.weight[:, dead] = 50 * down.weight.abs().max()
    return model


def toy_sentences(n: int = 48, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


RECIPE = Recipe.from_dict({"name": "toy4", "stages": [
    {"pass": "rtn", "targets": {"types": ["Linear"]},
     "config": {"bits": 4, "symmetric": False, "group_size": 16, "search": "mse"}},
    {"pass": "rtn", "targets": {"types": ["Embedding"]},
     "config": {"bits": 4, "symmetric": False, "group_size": 32, "search": "mse"}},
]})
LAYERS = ["embed", "blocks.0.up", "blocks.0.down", "blocks.1.up", SENSITIVE, "blocks.2.up", "blocks.2.down", "head"]


def encode(model: nn.Module, sentences: list[str]) -> torch.Tensor:
    """The plain reference: one whole forward per sentence (no batching, no replay)."""
    with torch.inference_mode():
        return torch.cat([model(**model.tokenize([s])) for s in sentences])


def alone(model: nn.Module, recipe: Recipe, name: str) -> nn.Module:
    """A copy of `model` with only layer `name` compressed, by the recipe stage that selects it."""
    for stage in recipe.stages:
        if any(t.name == name for t in stage.resolve(model, set())):
            one = Stage(stage.pass_name, stage.config, Selector(include=(name,)), stage.overrides)
            return compress(copy.deepcopy(model), Recipe((one,)))
    raise AssertionError(name)


@pytest.fixture(scope="module")
def rows() -> list[LayerSensitivity]:
    return layer_sensitivity(toy_encoder(), RECIPE, toy_sentences(), upgrades=default_upgrades, batch_size=16)


def test_every_selected_layer_has_a_row_and_the_sensitive_one_ranks_first(rows):
    assert sorted(r.name for r in rows) == sorted(LAYERS)
    assert rows[0].name == SENSITIVE
    assert rows[0].damage > 5 * rows[1].damage
    assert [r.damage for r in rows] == sorted((r.damage for r in rows), reverse=True)


def test_rows_match_the_layer_compressed_alone_and_run_whole(rows):
    model, sentences = toy_encoder(), toy_sentences()
    reference = encode(model, sentences)
    for row in rows:
        expected = fidelity(reference, encode(alone(model, RECIPE, row.name), sentences), n_queries=len(sentences))
        assert row.base.mean_cosine == pytest.approx(expected.mean_cosine, abs=1e-6), row.name
        assert row.base.p1_cosine == pytest.approx(expected.p1_cosine, abs=1e-5), row.name
        assert row.base.overlap_at_10 == pytest.approx(expected.overlap_at_10, abs=0.02), row.name


def test_bytes_are_the_encodings_as_stored(rows):
    by = {r.name: r for r in rows}
    model = toy_encoder()
    w = model.get_submodule("blocks.0.up").weight  # (64, 32)
    enc = quantize_weight(w.data, QuantScheme(4, False, 16), RangeSearch.MSE)
    assert by["blocks.0.up"].base.bytes == enc.nbytes == 64 * 32 // 2 + 2 * (64 * 2 * 2)  # codes + fp16 scale, zero
    assert by["blocks.0.up"].original_bytes == 64 * 32 * 4
    assert by["blocks.0.up"].bytes_saved == 64 * 32 * 4 - enc.nbytes
    assert by["blocks.0.up"].base.encoding == "int4 asym g16"
    assert by["embed"].base.encoding == "int4 asym g32"
    assert by["blocks.0.up"].params == 64 * 32


def test_upgrades_are_measured_like_the_base(rows):
    by = {r.name: r for r in rows}
    row = by[SENSITIVE]
    assert [u.changes for u in row.upgrades] == [{"bits": 8, "group_size": "channel"}]  # g16: not halved
    assert [u.encoding for u in row.upgrades] == ["int8 asym per-channel"]
    assert [u.encoding for u in by["embed"].upgrades] == ["int4 asym g16", "int8 asym per-channel"]
    assert row.upgrades[0].damage < row.damage / 10
    model, sentences = toy_encoder(), toy_sentences()
    upgraded = RECIPE.stages[0].config_for(SENSITIVE)
    config = RTNConfig(bits=8, symmetric=False, group_size="channel", search=RangeSearch.MSE, kernel=upgraded.kernel)
    stage = Stage("rtn", config, Selector(include=(SENSITIVE,)))
    got = encode(compress(copy.deepcopy(model), Recipe((stage,))), sentences)
    expected = fidelity(encode(model, sentences), got, n_queries=len(sentences))
    assert row.upgrades[0].mean_cosine == pytest.approx(expected.mean_cosine, abs=1e-6)


def test_the_model_is_left_exactly_as_it_was():
    model, sentences = toy_encoder(), toy_sentences(24)
    model.train()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = encode(model.eval(), sentences)
    model.train()
    layer_sensitivity(model, RECIPE, sentences, upgrades=default_upgrades, batch_size=8)
    assert model.training
    assert dict(model.named_modules()) == modules  # the very same module objects, nothing added
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in after.items())
    assert torch.equal(encode(model.eval(), sentences), before)


def test_replay_is_used_and_equals_whole_runs():
    model, sentences = toy_encoder(), toy_sentences(40)
    runner = Runner(model, tokenised_batches(model, sentences, 16, longest_first=True))
    assert runner.blocks is not None  # the fast path engaged on the toy's ModuleList
    before = {name: sorted(runner.before[name]) for name in LAYERS}
    assert before == {"embed": [], "blocks.0.up": [], "blocks.0.down": [], "blocks.1.up": [0], SENSITIVE: [0],
                      "blocks.2.up": [0, 1], "blocks.2.down": [0, 1], "head": [0, 1, 2]}
    whole = runner.encode()
    for replay in ({0}, {0, 1}, {0, 1, 2}, {1}):
        assert torch.equal(runner.encode(frozenset(replay)), whole)
    assert torch.allclose(whole, encode(model, sentences), atol=1e-5)


class Parallel(ToyEncoder):
    """Every block reads the embedding, not the previous block's output: replay stays exact."""

    def forward(self, input_ids, attention_mask):
        e = self.embed(input_ids)
        h = sum(block(e) for block in self.blocks)
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((h * mask).sum(1) / mask.sum(1))


class Looped(ToyEncoder):
    """The blocks run twice per forward: recorded outputs cannot stand in for them."""

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        for block in [*self.blocks, *self.blocks]:
            h = block(h)
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((h * mask).sum(1) / mask.sum(1))


@pytest.mark.parametrize("cls, replays", [(Parallel, True), (Looped, False)])
def test_other_block_wirings_measure_the_same_as_whole_runs(cls, replays):
    torch.manual_seed(0)
    model, sentences = cls().eval(), toy_sentences(24)
    assert (Runner(model, tokenised_batches(model, sentences, 8, longest_first=True)).blocks is not None) == replays
    rows = layer_sensitivity(model, RECIPE, sentences, batch_size=8)
    reference = encode(model, sentences)
    for row in rows:
        expected = fidelity(reference, encode(alone(model, RECIPE, row.name), sentences), n_queries=len(sentences))
        assert row.base.mean_cosine == pytest.approx(expected.mean_cosine, abs=1e-6), row.name


def test_a_single_stage_is_a_recipe():
    model = toy_encoder()
    stage = Stage("rtn", RTNConfig(bits=4, symmetric=False, group_size=16, search=RangeSearch.MINMAX),
                  Selector(types=("Linear",), include=("blocks.*",)))
    rows = layer_sensitivity(model, stage, toy_sentences(16), batch_size=16)
    assert sorted(r.name for r in rows) == sorted(n for n in LAYERS if n.startswith("blocks."))
    assert rows[0].name == SENSITIVE


@pytest.mark.parametrize("sentences, message", [
    (["one two three"] * 10, "10 sentences are too few"),
    ("one two three", "list of strings"),
    ([1] * 20, "list of strings"),
])
def test_bad_sentences(sentences, message):
    with pytest.raises(ConfigError, match=message):
        layer_sensitivity(toy_encoder(), RECIPE, sentences)


def test_a_model_without_tokenize_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="need a model with a tokenizer"):
        layer_sensitivity(model, "int8", toy_sentences(16))


def test_a_recipe_that_selects_nothing_is_refused():
    recipe = {"stages": [{"pass": "rtn", "targets": {"include": ["nothing.*"]}}]}
    with pytest.raises(RecipeError, match="matched no module"):
        layer_sensitivity(toy_encoder(), recipe, toy_sentences(16))


# --------------------------------------------------------------------------------- planning


def selected_bits_per_weight(model: nn.Module, names: list[str]) -> float:
    """Bits per weight of the named layers' weights as stored, read from the compressed modules."""
    encodings = [model.get_submodule(n).encoding for n in names]
    return 8.0 * sum(e.nbytes for e in encodings) / sum(e.numel for e in encodings)


def test_mixed_precision_upgrades_the_sensitive_layer_within_the_budget(rows):
    model, sentences = toy_encoder(), toy_sentences()
    base_bits = selected_bits_per_weight(compress(copy.deepcopy(model), RECIPE), LAYERS)
    budget = base_bits + 0.5
    recipe = mixed_precision_recipe(rows, RECIPE, budget_bits=budget)
    assert recipe.name == "toy4-mixed"
    mixed = compress(copy.deepcopy(model), recipe)
    got_bits = selected_bits_per_weight(mixed, LAYERS)
    assert base_bits < got_bits <= budget
    assert got_bits == pytest.approx(plan_mixed_precision(rows, budget_bits=budget).bits_per_weight)
    assert mixed.get_submodule(SENSITIVE).encoding.scheme.bits == 8
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    reference = encode(model, sentences)
    base_cos = fidelity(reference, encode(compress(copy.deepcopy(model), RECIPE), sentences), n_queries=10).mean_cosine
    assert fidelity(reference, encode(mixed, sentences), n_queries=10).mean_cosine > base_cos


def test_a_budget_in_bytes_is_honoured(rows):
    base = sum(r.base.bytes for r in rows)
    plan = plan_mixed_precision(rows, budget_bytes=base + 2000)
    assert base < plan.bytes <= base + 2000
    assert SENSITIVE in plan.upgraded


def test_the_budget_at_the_base_size_changes_nothing(rows):
    base = sum(r.base.bytes for r in rows)
    recipe = mixed_precision_recipe(rows, RECIPE, budget_bytes=base)
    assert recipe.stages == RECIPE.stages


@pytest.mark.parametrize("kwargs, message", [
    ({"budget_bits": 1.0}, "over the budget"),
    ({}, "exactly one budget"),
    ({"budget_bits": 5.0, "budget_bytes": 10**6}, "exactly one budget"),
    ({"budget_bits": -1.0}, "not valid"),
    ({"budget_bytes": 0}, "not valid"),
])
def test_bad_budgets(rows, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        mixed_precision_recipe(rows, RECIPE, **kwargs)


def test_rows_from_another_recipe_are_refused(rows):
    one_stage = Recipe((RECIPE.stages[0],))
    with pytest.raises(ConfigError, match="stage 1"):
        mixed_precision_recipe(rows, one_stage, budget_bits=8.0)


@pytest.mark.parametrize("config, expected", [
    ({"bits": 4, "group_size": 64}, [{"group_size": 32}, {"bits": 8, "group_size": "channel"}]),
    ({"bits": 3, "group_size": 16}, [{"bits": 4}]),
    ({"bits": 2, "group_size": "channel"}, [{"bits": 3}]),
    ({"bits": 8, "group_size": 64}, [{"group_size": 32}]),
    ({"weight_bits": 7, "group_size": "channel"}, []),
])
def test_default_upgrades(config, expected):
    assert default_upgrades(config) == expected


# Synthetic rows: any damages and sizes, to check the planner's contract, not the measurement.
option = st.tuples(st.floats(0, 0.5), st.integers(1, 5000))


@st.composite
def synthetic_rows(draw):
    n = draw(st.integers(1, 6))
    names = draw(st.lists(st.text("ab.*?[]", min_size=1, max_size=6), min_size=n, max_size=n, unique=True))
    rows = []
    for name in names:
        params = draw(st.integers(8, 4000))
        base_damage, base_bytes = draw(option)
        ups = draw(st.lists(option, max_size=3))
        m = [Measurement({"bits": 8} if i else {}, "x", b, 1 - d, 1 - d, 1.0) for i, (d, b) in
             enumerate([(base_damage, base_bytes)] + ups)]
        rows.append(LayerSensitivity(name, 0, "Linear", params, 4 * params, m[0], tuple(m[1:])))
    return rows


@settings(max_examples=200, deadline=None)
@given(synthetic_rows(), st.integers(0, 20000))
def test_plan_fits_the_budget_and_no_single_upgrade_still_fits(rows, extra):
    budget = sum(r.base.bytes for r in rows) + extra
    plan = plan_mixed_precision(rows, budget_bytes=budget)
    assert plan.bytes <= budget
    assert plan.bytes == sum(m.bytes for _, m in plan.choices)
    chosen = dict((r.name, m) for r, m in plan.choices)
    for row in rows:  # greedy stops only when no improving option fits
        for opt in (row.base, *row.upgrades):
            better = opt.damage < chosen[row.name].damage
            assert not (better and plan.bytes - chosen[row.name].bytes + opt.bytes <= budget)


@settings(max_examples=100, deadline=None)
@given(synthetic_rows(), st.integers(0, 20000))
def test_mixed_recipe_round_trips_and_targets_only_the_planned_layers(rows, extra):
    base = Recipe((Stage("rtn", RTNConfig(bits=4, symmetric=False, group_size=64, search=RangeSearch.MSE)),), name="r")
    recipe = mixed_precision_recipe(rows, base, budget_bytes=sum(r.base.bytes for r in rows) + extra)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    upgraded = plan_mixed_precision(rows, budget_bytes=sum(r.base.bytes for r in rows) + extra).upgraded
    for row in rows:
        assert recipe.stages[0].config_for(row.name).quant.bits == (8 if row.name in upgraded else 4)


@given(st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=12))
def test_exact_pattern_matches_its_name_only(name, other):
    assert fnmatch.fnmatchcase(name, exact_pattern(name))
    assert fnmatch.fnmatchcase(other, exact_pattern(name)) == (other == name)


def test_a_recipe_that_changes_unselected_modules_is_refused(monkeypatch):
    import modelpress.passes.base as base
    from modelpress.errors import UnsupportedError

    from modelpress.passes.config import pass_config

    monkeypatch.setattr(base, "PASSES", dict(base.PASSES))
    monkeypatch.setattr(base, "_BY_CONFIG", dict(base._BY_CONFIG))

    @pass_config
    class SpillConfig(RTNConfig):
        """RTN's config under another type: each config type configures one pass."""

    @base.register_pass("spill", SpillConfig, (nn.Linear,))
    def spill(model, targets, context):  # quantises its layers, and also folds a scale into the head
        base.PASSES["rtn"].fn(model, targets, context)
        model.head.bias.data.mul_(2)

    recipe = {"stages": [{"pass": "spill", "targets": {"include": ["blocks.*"]},
                          "config": {"bits": 4, "group_size": 16}}]}
    model = toy_encoder()
    bias = model.head.bias.detach().clone()
    with pytest.raises(UnsupportedError, match="also changes 'head.bias'"):
        layer_sensitivity(model, recipe, toy_sentences(16))
    assert torch.equal(model.head.bias, bias)
