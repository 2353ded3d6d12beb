"""The pruning configs: one-line errors, recipe errors naming the stage, YAML round trips, layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress
from modelpress.encodings.sparse import SparseLayout, SparseTensor
from modelpress.errors import ConfigError, RecipeError
from modelpress.passes import MagnitudeConfig, SparseGPTConfig, WandaConfig


# ---------------------------------------------------------------- configs


BAD_CONFIGS = [
    (MagnitudeConfig, {"sparsity": -0.1}, "sparsity"),
    (MagnitudeConfig, {"sparsity": 1.0}, "sparsity"),
    (MagnitudeConfig, {"sparsity": 1.5}, "sparsity"),
    (MagnitudeConfig, {"sparsity": True}, "sparsity"),
    (MagnitudeConfig, {"sparsity": "0.5"}, "sparsity"),
    (MagnitudeConfig, {}, "needs a sparsity"),
    (MagnitudeConfig, {"pattern": "4:2"}, "N:M"),
    (MagnitudeConfig, {"pattern": "2:2"}, "N:M"),
    (MagnitudeConfig, {"pattern": "2-4"}, "pattern"),
    (MagnitudeConfig, {"pattern": "2:4", "sparsity": 0.6}, "contradicts"),
    (MagnitudeConfig, {"pattern": "2:4", "scope": "global"}, "no global scope"),
    (MagnitudeConfig, {"sparsity": 0.5, "scope": "everywhere"}, "everywhere"),
    (MagnitudeConfig, {"sparsity": 0.5, "bits": 4}, "same count kept in every row"),
    (MagnitudeConfig, {"sparsity": 0.5, "bits": 5, "scope": "row"}, "bit width"),
    (MagnitudeConfig, {"sparsity": 0.5, "bits": 4, "scope": "row", "group_size": "tensor"}, "per row or in groups"),
    (MagnitudeConfig, {"sparsity": 0.5, "kernel": "int8_mm"}, "cannot run a sparse weight"),
    (MagnitudeConfig, {"sparsity": 0.5, "version": 2}, "version"),
    (SparseGPTConfig, {"sparsity": 0.5, "damp": 2.0}, "damp"),
    (SparseGPTConfig, {"sparsity": 0.5, "block_size": 0}, "block_size"),
    (SparseGPTConfig, {"pattern": "4:8", "block_size": 12}, "multiple of M"),
    (WandaConfig, {"sparsity": 0.5, "search": "best"}, "best"),
]


@pytest.mark.parametrize("cls, fields, message", BAD_CONFIGS)
def test_invalid_configs_give_one_line_errors(cls, fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        cls(**fields)
    assert "\n" not in str(info.value)


def test_recipe_errors_name_the_stage():
    with pytest.raises(RecipeError, match=r"stage 0 \(magnitude\).*sparsity"):
        modelpress.Recipe.from_yaml("stages: [{pass: magnitude, config: {sparsity: 1.2}}]")


def test_configs_round_trip_through_yaml():
    recipe = modelpress.Recipe.from_yaml(
        "stages: [{pass: sparsegpt, config: {pattern: '2:4', bits: 4, group_size: 32}, targets: {types: [Linear]}}]")
    again = modelpress.Recipe.from_yaml(recipe.to_yaml())
    assert again.stages[0].config == recipe.stages[0].config
    assert recipe.stages[0].config.nm == (2, 4) and recipe.stages[0].config.target_sparsity == 0.5


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
def test_magnitude_stores_positions_in_the_layout_asked_for(layout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    dense = model[0].weight.detach().clone()
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "targets": {"types": ["Linear"]},
                                            "config": {"sparsity": 0.9, "layout": layout}}]})
    enc = model[0].encoding
    assert isinstance(enc, SparseTensor) and enc.layout is SparseLayout(layout)
    assert torch.equal(enc.decode(), dense * enc.mask())


def test_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="layout 'zip' is not valid"):
        MagnitudeConfig(sparsity=0.5, layout="zip")
