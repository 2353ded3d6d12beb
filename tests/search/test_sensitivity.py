"""Per-layer sensitivity on a toy sentence encoder with one layer made sensitive (tests/_toy_encoder.py).

Every measured number is checked against a plain computation: the same layer compressed alone by
`compress` on a fresh copy, run as a whole forward, scored by `fidelity`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.compress import compress
from modelpress.encodings import QuantScheme
from modelpress.errors import ConfigError, RecipeError
from modelpress.evaluate.fidelity import fidelity
from modelpress.encodings import RangeSearch, quantize_weight
from modelpress.passes.quantize import RTNConfig
from modelpress.recipe import Recipe, Selector, Stage
from modelpress.data.batches import tokenised_batches
from modelpress.search import default_upgrades, layer_sensitivity
from modelpress.search.replay import Runner
from _toy_encoder import LAYERS, RECIPE, SENSITIVE, ToyEncoder, alone, encode, toy_encoder, toy_sentences


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
