"""Refining stages: a pass registered with refines=True may select modules an earlier stage took;
every other pass never re-takes a module."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import modelpress.passes.base as base
from modelpress.compress import compress
from modelpress.encodings import ClusteredTensor, QuantizedTensor
from modelpress.encodings.sparse import SparseTensor
from modelpress.errors import RecipeError, UnsupportedError
from modelpress.nn import CompressedLinear
from modelpress.passes.base import PASSES, register_pass
from modelpress.recipe import Recipe, Stage


@dataclass(frozen=True)
class TouchConfig:
    version: int = 1


@dataclass(frozen=True)
class PlainConfig:
    version: int = 1


@pytest.fixture
def seen(monkeypatch):
    """Two test passes in a private registry: 'touch' refines, 'plain' does not; both record their targets."""
    monkeypatch.setattr(base, "PASSES", dict(PASSES))
    monkeypatch.setattr(base, "_BY_CONFIG", dict(base._BY_CONFIG))
    calls: list[tuple[str, list[str]]] = []

    def recorder(name):
        def fn(model, targets, context):
            calls.append((name, [t.name for t in targets]))
        return fn

    register_pass("touch", TouchConfig, (nn.Linear, CompressedLinear), refines=True)(recorder("touch"))
    register_pass("plain", PlainConfig, (nn.Linear, CompressedLinear))(recorder("plain"))
    return calls


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_refines_is_recorded_and_defaults_to_false(seen):
    assert base.PASSES["touch"].refines is True and base.PASSES["plain"].refines is False
    assert PASSES["rtn"].refines is False and PASSES["magnitude"].refines is False
    assert PASSES["simplify"].refines is False
    assert PASSES["kmeans"].refines is True


def test_a_refining_stage_selects_taken_and_untaken_modules(seen):
    compress(model(), {"stages": [{"pass": "rtn", "targets": {"include": ["0"]}}, {"pass": "touch"}]})
    assert seen == [("touch", ["0", "2"])]  # "0" was rewritten by rtn, "2" was never taken


def test_a_plain_stage_never_retakes(seen):
    compress(model(), {"stages": [{"pass": "rtn", "targets": {"include": ["0"]}}, {"pass": "plain"}]})
    assert seen == [("plain", ["2"])]


def test_a_plain_stage_after_a_refining_one_skips_what_it_took(seen):
    with pytest.raises(RecipeError, match=r"stage 1 \(plain\) matched no module"):
        compress(model(), {"stages": [{"pass": "touch"}, {"pass": "plain"}]})
    assert seen == [("touch", ["0", "2"])]


def test_a_refining_stage_still_honours_its_module_types_and_selector(seen):
    m = model()
    stage = Stage.from_dict({"pass": "touch", "targets": {"ignore": ["2"]}}, 0)
    assert [t.name for t in stage.resolve(m, taken={"0", "1", "2"})] == ["0"]  # ReLU "1" is not a Linear
    assert [t.name for t in Stage.from_dict({"pass": "plain"}, 0).resolve(m, taken={"0"})] == ["2"]


def test_rtn_twice_selects_nothing_the_second_time():
    with pytest.raises(RecipeError, match=r"stage 1 \(rtn\) matched no module"):
        compress(model(), {"stages": [{"pass": "rtn"}, {"pass": "rtn"}]})


def test_prune_then_cluster_refines_the_pruned_layers():
    m = compress(model(), {"stages": [{"pass": "magnitude", "config": {"sparsity": 0.5}},
                                      {"pass": "kmeans", "config": {"bits": 3}}]})
    for i in (0, 2):
        assert isinstance(m[i].encoding, SparseTensor) and isinstance(m[i].encoding.values, ClusteredTensor)


def test_refining_an_already_quantised_layer_is_refused_clearly():
    with pytest.raises(UnsupportedError, match=r"layer '0' holds a quantized weight: kmeans clusters float weights"):
        compress(model(), {"stages": [{"pass": "rtn", "targets": {"include": ["0"]}}, {"pass": "kmeans"}]})


def test_ignore_keeps_a_refining_stage_off_a_quantised_layer():
    m = compress(model(), {"stages": [{"pass": "rtn", "targets": {"include": ["0"]}},
                                      {"pass": "kmeans", "targets": {"ignore": ["0"]}}]})
    assert isinstance(m[0].encoding, QuantizedTensor) and isinstance(m[2].encoding, ClusteredTensor)


def test_recipe_round_trips_with_a_refining_stage():
    r = Recipe.from_dict({"stages": [{"pass": "magnitude", "config": {"sparsity": 0.5}},
                                     {"pass": "kmeans", "config": {"bits": 5, "init": "density"}}]})
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_types_name_the_layer_a_compressed_module_replaced():
    m = compress(model(), {"stages": [{"pass": "magnitude", "config": {"sparsity": 0.5}, "targets": {"types": ["Linear"]}},
                                      {"pass": "kmeans", "targets": {"types": ["Linear"]}}]})
    assert all(isinstance(m[i].encoding.values, ClusteredTensor) for i in (0, 2))
    stage = Stage.from_dict({"pass": "kmeans", "targets": {"types": ["CompressedLinear"]}}, 0)
    assert [t.name for t in stage.resolve(m, taken=set())] == ["0", "2"]
    assert Stage.from_dict({"pass": "kmeans", "targets": {"types": ["Conv2d"]}}, 0).resolve(m, set()) == []
