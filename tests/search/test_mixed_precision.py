"""Mixed precision from sensitivity rows: budgets honoured, the greedy contract (hypothesis), recipes that
round-trip, and the exact-name overrides they are made of."""

from __future__ import annotations

import copy
import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modelpress.compress import compress
from modelpress.errors import ConfigError
from modelpress.evaluate.fidelity import fidelity
from modelpress.encodings import RangeSearch
from modelpress.passes.quantize import RTNConfig
from modelpress.recipe import Recipe, Stage
from modelpress.search import (
    LayerSensitivity,
    Measurement,
    default_upgrades,
    mixed_precision_recipe,
    plan_mixed_precision,
)
from modelpress.search.overrides import exact_pattern
from _toy_encoder import LAYERS, RECIPE, SENSITIVE, encode, toy_encoder, toy_sentences


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
