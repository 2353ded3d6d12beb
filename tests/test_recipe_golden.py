"""Recipes parse to what they parsed to before the configs were reshaped (nested WeightQuant, flat YAML keys):
tests/golden/recipes_main.json holds main's `Recipe.to_dict()` of every preset, every example YAML and
one flat config per pass (plus overrides), written by tests/golden/make_recipes_golden.py on main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelpress.passes.config import config_to_dict
from modelpress.presets import preset, preset_names
from modelpress.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "recipes_main.json").read_text(encoding="utf-8"))
OVERRIDDEN = "encoder.layer.0.attention.self.query"  # the name make_recipes_golden.py resolved overrides for


def test_the_golden_file_covers_every_preset_and_example():
    assert list(GOLDEN["presets"]) == preset_names()
    assert sorted(GOLDEN["examples"]) == sorted(p.name for p in (ROOT / "examples").glob("*.y*ml"))
    assert {case["input"]["stages"][0]["pass"] for case in GOLDEN["stages"]} == {
        "rtn", "dynamic_int8", "gptq", "awq", "qat", "magnitude", "wanda", "sparsegpt", "prune_ffn", "prune_heads",
        "prune_channels", "kmeans", "simplify", "lowrank"}


@pytest.mark.parametrize("name", list(GOLDEN["presets"]))
def test_every_preset_parses_as_on_main(name):
    assert preset(name).to_dict() == GOLDEN["presets"][name]


@pytest.mark.parametrize("name", list(GOLDEN["examples"]))
def test_every_example_recipe_parses_as_on_main(name):
    assert Recipe.from_file(ROOT / "examples" / name).to_dict() == GOLDEN["examples"][name]


@pytest.mark.parametrize("case", GOLDEN["stages"], ids=lambda c: f"{c['input']['stages'][0]['pass']}:"
                         f"{','.join(sorted(c['input']['stages'][0]['config'])) or 'defaults'}")
def test_every_pass_config_parses_as_on_main(case):
    recipe = Recipe.from_dict(case["input"])
    assert recipe.to_dict() == case["to_dict"]
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe  # flat YAML round-trips to the same nested configs
    for name, expected in case.get("config_for", {}).items():
        assert config_to_dict(recipe.stages[0].config_for(name)) == expected
