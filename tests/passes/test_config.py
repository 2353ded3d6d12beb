"""Pass configs: one version check, one nested WeightQuant filled from flat keywords and flat YAML keys,
and one pass per config type."""

from __future__ import annotations

import dataclasses

import pytest

import modelpress
from modelpress.errors import ConfigError, RecipeError
from modelpress.passes import (PASSES, AWQConfig, DynamicInt8Config, GPTQConfig, GradualConfig, LowRankConfig,
                               MagnitudeConfig, PassConfig, QATConfig, RangeSearch, RTNConfig, SparseGPTConfig,
                               WeightQuant, config_from_dict, config_to_dict, pass_for, pass_for_config)
from modelpress.passes.base import register_pass

CONFIG_TYPES = sorted({spec.config_type for spec in PASSES.values()} | {GradualConfig}, key=lambda t: t.__name__)
QUANTISING = [RTNConfig, DynamicInt8Config, GPTQConfig, AWQConfig, QATConfig, MagnitudeConfig, SparseGPTConfig,
              LowRankConfig]


def minimal(config_type: type) -> dict:
    """The fewest fields that make a valid config of `config_type`."""
    return {MagnitudeConfig: {"sparsity": 0.5}, SparseGPTConfig: {"sparsity": 0.5}, LowRankConfig: {"rank": 4}}.get(
        config_type, {"sparsity": 0.5} if "sparsity" in {f.name for f in dataclasses.fields(config_type)} else {})


# ---------------------------------------------------------------------------------------------- version


@pytest.mark.parametrize("config_type", CONFIG_TYPES, ids=lambda t: t.__name__)
def test_every_config_checks_its_version_in_the_one_place(config_type):
    assert issubclass(config_type, PassConfig)
    assert config_type(**minimal(config_type)).version == 1
    with pytest.raises(ConfigError, match=rf"^{config_type.__name__} version 2 is not supported: this modelpress "
                                          r"reads version 1$"):
        config_type(**minimal(config_type), version=2)


@pytest.mark.parametrize("config_type", CONFIG_TYPES, ids=lambda t: t.__name__)
def test_no_config_checks_its_version_itself(config_type):
    """The check lives in PassConfig.__post_init__; a config's own checks go in `validate`."""
    assert "__post_init__" not in config_type.__dict__


# ---------------------------------------------------------------------------------------------- WeightQuant


def test_flat_keywords_fill_the_nested_weight_quant():
    nested = GPTQConfig(quant=WeightQuant(bits=4, symmetric=False, group_size=64, search=RangeSearch.MSE))
    assert GPTQConfig(bits=4, group_size=64) == nested == GPTQConfig()
    assert GPTQConfig(bits=3).quant == WeightQuant(bits=3, symmetric=False, group_size=64, search=RangeSearch.MSE)
    assert GPTQConfig(quant=WeightQuant(bits=8, group_size=32), bits=4).quant.bits == 4  # flat wins over quant
    assert GPTQConfig(search="minmax").quant.search is RangeSearch.MINMAX


@pytest.mark.parametrize("config_type", QUANTISING, ids=lambda t: t.__name__)
def test_every_quantising_config_holds_one_weight_quant(config_type):
    config = config_type(**minimal(config_type))
    assert isinstance(config.quant, WeightQuant)
    assert {f.name for f in dataclasses.fields(config_type)}.isdisjoint({"bits", "symmetric", "group_size", "search",
                                                                        "init"})


def test_weight_quant_validates_its_fields():
    with pytest.raises(ConfigError, match="unsupported bit width 5"):
        WeightQuant(bits=5)
    with pytest.raises(ConfigError, match="group_size 'row' is not valid"):
        WeightQuant(group_size="row")
    with pytest.raises(ConfigError, match="search 'best' is not valid"):
        WeightQuant(search="best")
    assert WeightQuant(bits=None).scheme is None  # kept in float (pruning's kept values, low-rank factors)
    assert WeightQuant(bits=4, symmetric=False, group_size=32).scheme.describe() == "int4 asym g32"


@pytest.mark.parametrize("config, message", [
    (lambda: LowRankConfig(rank=4, quant=WeightQuant(bits=4, symmetric=True)), "asymmetrically"),
    (lambda: LowRankConfig(rank=4, symmetric=True), "unexpected keyword argument 'symmetric'"),
    (lambda: DynamicInt8Config(bits=4), "unexpected keyword argument 'bits'"),
    (lambda: DynamicInt8Config(quant=WeightQuant(bits=4)), "int8 symmetric weights"),
    (lambda: RTNConfig(kernel="dynamic_int8"), "RTN is weight-only"),
])
def test_fields_a_technique_fixes_are_refused(config, message):
    with pytest.raises((ConfigError, TypeError), match=message):
        config()


# ---------------------------------------------------------------------------------------------- flat YAML


@pytest.mark.parametrize("config_type, data, quant", [
    (RTNConfig, {"bits": 4, "symmetric": False, "group_size": 32, "search": "mse"},
     WeightQuant(bits=4, symmetric=False, group_size=32, search=RangeSearch.MSE)),
    (QATConfig, {"bits": 2, "init": "minmax"}, WeightQuant(bits=2, symmetric=False, group_size="channel",
                                                           search=RangeSearch.MINMAX)),
    (LowRankConfig, {"rank": 2, "bits": 8, "group_size": 16}, WeightQuant(bits=8, symmetric=False, group_size=16,
                                                                          search=RangeSearch.MSE)),
    (DynamicInt8Config, {"group_size": "tensor"}, WeightQuant(bits=8, symmetric=True, group_size="tensor",
                                                              search=RangeSearch.MSE)),
    (MagnitudeConfig, {"sparsity": 0.5}, WeightQuant(bits=None, symmetric=False, group_size="channel",
                                                     search=RangeSearch.MSE)),
])
def test_flat_yaml_keys_become_the_nested_config_and_back(config_type, data, quant):
    config = config_from_dict(config_type, data, "test")
    assert config.quant == quant
    flat = config_to_dict(config)
    assert {k: flat[k] for k in data} == data and "quant" not in flat and list(flat)[-1] == "version"
    assert config_from_dict(config_type, flat, "test") == config


@pytest.mark.parametrize("config_type, key", [
    (LowRankConfig, "symmetric"), (DynamicInt8Config, "bits"), (QATConfig, "search"), (RTNConfig, "quant"),
    (RTNConfig, "init")])
def test_keys_outside_a_configs_flat_allow_list_are_refused(config_type, key):
    with pytest.raises(RecipeError, match=rf"unknown field\(s\) \['{key}'\]; allowed fields are"):
        config_from_dict(config_type, {**minimal(config_type), key: 1}, "test")


# ---------------------------------------------------------------------------------------------- dispatch by type


def test_every_pass_is_found_from_its_config_type():
    assert len({spec.config_type for spec in PASSES.values()}) == len(PASSES)  # one pass per config type
    for name, spec in PASSES.items():
        assert pass_for_config(spec.config_type(**minimal(spec.config_type))) is pass_for(name)


def test_a_config_of_no_pass_is_refused():
    with pytest.raises(RecipeError, match=r"a GradualConfig configures no pass: give one of \[.*'GPTQConfig'"):
        pass_for_config(GradualConfig())
    with pytest.raises(RecipeError, match="a dict configures no pass"):
        pass_for_config({"bits": 4})


def test_a_config_type_registers_one_pass_only(monkeypatch):
    import modelpress.passes.base as base

    monkeypatch.setattr(base, "PASSES", dict(base.PASSES))
    monkeypatch.setattr(base, "_BY_CONFIG", dict(base._BY_CONFIG))
    with pytest.raises(ValueError, match="registered twice"):
        register_pass("gptq2", GPTQConfig, ())(lambda model, targets, context: None)


@pytest.mark.parametrize("config_type", sorted({s.config_type for s in PASSES.values()}, key=lambda t: t.__name__),
                         ids=lambda t: t.__name__)
def test_every_pass_config_is_importable_from_the_package(config_type):
    assert getattr(modelpress, config_type.__name__) is config_type
    assert config_type.__name__ in modelpress.__all__
