"""Sensitivity of a causal LM: the next-token KL of each layer compressed alone equals the KL of a plain
whole forward with that layer swapped in (replay changes nothing), and the rows plan mixed precision."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.passes.quantize import RTNConfig
from modelpress.recipe import Recipe, Selector, Stage
from modelpress.search import lm_layer_sensitivity, mixed_precision_recipe, next_token_kl
from modelpress.search.lm_sensitivity import next_token_log_probs

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from _tiny_decoders import tiny_decoder  # noqa: E402

THREE_BITS = Recipe((Stage.of(RTNConfig(bits=3, symmetric=True, group_size=32),
                              Selector(types=("Linear",), ignore=("lm_head",))),), name="q3")


def test_next_token_kl_is_the_mean_kl_per_position():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    q = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    expected = sum(float((p[b, t].exp() * (p[b, t] - q[b, t])).sum()) for b in range(2) for t in range(5)) / 10
    assert next_token_kl(p, q) == pytest.approx(expected, rel=1e-6)
    assert next_token_kl(p, p) == 0.0
    with pytest.raises(ConfigError, match="same windows"):
        next_token_kl(p, q[:1])


@pytest.fixture(scope="module")
def llm_rows():
    model = tiny_decoder(layers=2)
    windows = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    rows = lm_layer_sensitivity(model, THREE_BITS, windows, upgrades=lambda c: [{"bits": 4}])
    return model, windows, rows


def test_each_rows_kl_is_that_of_a_whole_forward_with_the_layer_alone_compressed(llm_rows):
    model, windows, rows = llm_rows
    assert len(rows) == 14 and {r.base.encoding for r in rows} == {"int3 sym g32"}
    with torch.no_grad():
        reference = next_token_log_probs(model(input_ids=windows, use_cache=False))
        for row in rows[:3] + rows[-2:]:  # the most and the least damaged
            alone = copy.deepcopy(model)
            alone.set_submodule(row.name, _compressed_layer(model, row.name))
            got = next_token_log_probs(alone(input_ids=windows, use_cache=False))
            assert row.damage == pytest.approx(next_token_kl(reference, got), rel=1e-4, abs=1e-9)


def _compressed_layer(model, name):
    import modelpress

    return modelpress.compress(copy.deepcopy(model), {name: RTNConfig(bits=3, symmetric=True, group_size=32),
                                                      "*": None}).get_submodule(name)


def test_four_bits_damage_less_and_a_budget_buys_the_best_upgrades(llm_rows):
    model, windows, rows = llm_rows
    assert sum(r.upgrades[0].damage for r in rows) < 0.5 * sum(r.damage for r in rows)
    base_bytes = sum(r.base.bytes for r in rows)
    mixed = mixed_precision_recipe(rows, THREE_BITS, budget_bytes=base_bytes + 3000)
    upgraded = [pattern for pattern, _ in mixed.stages[0].overrides]
    assert upgraded and sum(r.upgrades[0].bytes - r.base.bytes for r in rows if r.name in upgraded) <= 3000
    # the greedy plan's first pick is the upgrade that removes the most damage per extra byte
    gain = {r.name: (r.damage - r.upgrades[0].damage) / (r.upgrades[0].bytes - r.base.bytes) for r in rows}
    assert max(gain, key=gain.get) in upgraded

def test_windows_must_be_token_ids():
    with pytest.raises(ConfigError, match="token ids"):
        lm_layer_sensitivity(tiny_decoder(), THREE_BITS, torch.zeros(2, 8))
