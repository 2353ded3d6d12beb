"""The multiple-choice knapsack: exact against brute force (hypothesis), budgets honoured, the estimated front
monotone, errors that name the fix."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch

from modelpress.compress import compress
from modelpress.errors import ConfigError
from modelpress.recipe import Recipe
from modelpress.search.allocate import Knapsack, pinned_allocations, solve_knapsack
from modelpress.search.joint import pareto_front
from modelpress.search.space import allocation_recipe, default_space, is_q4_1_like
from _toy_encoder import toy_encoder


def brute_force(costs, damages, budget):
    """The plain reference: every combination of one option per layer."""
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        total = sum(costs[i][k] for i, k in enumerate(choice))
        if total > budget:
            continue
        damage = sum(damages[i][k] for i, k in enumerate(choice))
        if best is None or damage < best[0] - 1e-12:
            best = (damage, total)
    return best


layers = st.lists(st.lists(st.tuples(st.integers(1, 30), st.floats(0, 1, allow_nan=False)), min_size=1, max_size=4),
                  min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(layers=layers, budget=st.integers(1, 120), unit=st.sampled_from([1, 2, 5]))
def test_knapsack_is_exact_when_costs_are_whole_units(layers, budget, unit):
    costs = [[c * unit for c, _ in layer] for layer in layers]
    damages = [[d for _, d in layer] for layer in layers]
    want = brute_force(costs, damages, budget * unit)
    got = Knapsack(costs, damages, budget * unit, unit=unit).best_within(budget * unit)
    if want is None:
        assert got is None
        return
    assert got is not None
    assert got.damage == pytest.approx(want[0], abs=1e-9)
    assert got.bytes <= budget * unit
    assert got.bytes == sum(costs[i][k] for i, k in enumerate(got.choice))
    assert got.damage == pytest.approx(sum(damages[i][k] for i, k in enumerate(got.choice)))


@settings(max_examples=100, deadline=None)
@given(layers=layers, budget=st.integers(1, 120), data=st.data())
def test_pinned_allocations_are_the_best_that_take_each_option(layers, budget, data):
    costs = [[c for c, _ in layer] for layer in layers]
    damages = [[d for _, d in layer] for layer in layers]
    row = data.draw(st.integers(0, len(layers) - 1))
    got = {a.choice[row]: a for a in pinned_allocations(costs, damages, budget, row)}
    for k in range(len(costs[row])):
        pinned = [c if i != row else [c[k]] for i, c in enumerate(costs)]
        want = brute_force(pinned, [d if i != row else [d[k]] for i, d in enumerate(damages)], budget)
        if want is None:
            assert k not in got
            continue
        a = got[k]
        assert a.damage == pytest.approx(want[0], abs=1e-9) and a.bytes <= budget
        assert a.bytes == sum(costs[i][j] for i, j in enumerate(a.choice))
        assert a.damage == pytest.approx(sum(damages[i][j] for i, j in enumerate(a.choice)))


@settings(max_examples=100, deadline=None)
@given(layers=layers, budget=st.integers(1, 120), resolution=st.integers(1, 64))
def test_rounded_costs_never_break_the_budget(layers, budget, resolution):
    """With costs rounded up to units the answer may be worse than the optimum, but it always fits."""
    costs = [[c for c, _ in layer] for layer in layers]
    damages = [[d for _, d in layer] for layer in layers]
    got = Knapsack(costs, damages, budget, resolution=resolution).best_within(budget)
    want = brute_force(costs, damages, budget)
    if got is not None:
        assert got.bytes <= budget
        assert want is not None and got.damage >= want[0] - 1e-9


def test_the_estimated_front_gets_less_damaged_as_it_grows():
    costs = [[1, 2, 4], [1, 3], [2, 4, 8]]
    damages = [[0.5, 0.2, 0.0], [0.4, 0.1], [0.9, 0.3, 0.05]]
    front = Knapsack(costs, damages, 16, unit=1).estimated_front(points=32)
    assert len(front) >= 4
    assert all(a.bytes < b.bytes and a.damage > b.damage for a, b in zip(front, front[1:]))
    for a in front:
        assert a.damage == pytest.approx(brute_force(costs, damages, a.bytes)[0])


def test_no_allocation_fits_names_the_smallest():
    with pytest.raises(ConfigError, match="smallest options need 5"):
        solve_knapsack([[3, 4], [2]], [[0.1, 0.0], [0.0]], 4)
    with pytest.raises(ConfigError, match="not finite"):
        Knapsack([[1]], [[float("nan")]], 4)


def test_pareto_front_matches_a_plain_check():
    points = [{"a": 1, "b": 5}, {"a": 2, "b": 4}, {"a": 2, "b": 6}, {"a": 3, "b": 4}, {"a": 4, "b": 1}]
    assert pareto_front(points, ("a", "b")) == [0, 1, 4]


def test_options_of_one_pass_share_one_stage_with_per_layer_overrides():
    """A choice mixing three RTN options and a sparsity option: two stages, and every layer compressed as its own
    option alone compresses it (RTN and magnitude pruning are layer-local), exactly."""
    space = {o.label: o for o in default_space("joint")}
    choice = {"blocks.0.up": space["int3 g32"], "blocks.0.down": space["int4 g64"], "blocks.1.up": space["int3 g32"],
              "blocks.1.down": space["int8 ch"], "blocks.2.down": space["2:4+int4"], "embed": space["int3 g32"]}
    recipe = allocation_recipe(choice)
    assert [s.pass_name for s in recipe.stages] == ["magnitude", "rtn"]  # by their first labels
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    model = compress(toy_encoder(), recipe)
    for name, option in choice.items():
        alone = compress(toy_encoder(), Recipe((option.stage([name]),))).get_submodule(name).encoding
        got = model.get_submodule(name).encoding
        assert got.describe() == alone.describe()
        assert got.arrays().keys() == alone.arrays().keys()
        assert all(torch.equal(got.arrays()[k], alone.arrays()[k]) for k in got.arrays())
    untouched = toy_encoder()
    assert torch.equal(model.blocks[2].up.weight, untouched.blocks[2].up.weight)


def test_the_llm_spaces_differ_by_the_q4_1_like_formats_only():
    with_q4_1, without = default_space("llm"), default_space("llm-no-q4_1")
    assert {o.label for o in with_q4_1} - {o.label for o in without} == {o.label for o in with_q4_1 if is_q4_1_like(o)}
    assert {o.label for o in with_q4_1 if is_q4_1_like(o)} == {"gptq4 a32", "emb int4 a32"}
    assert not any(is_q4_1_like(o) for o in without)
    assert all(o.config_dict.get("symmetric") for o in without)  # every 4-bit group there is Q4_0's grid
