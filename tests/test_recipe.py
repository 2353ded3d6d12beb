"""Recipes: parsing through allow-lists, YAML round trips, clear errors, and compress() given a
preset name, a YAML file, a dict or a Recipe."""

from __future__ import annotations

import re

import textwrap

import pytest
import torch
import yaml
from torch import nn

from modelpress.nn.provenance import provenance
from modelpress.compress import compress, resolve_recipe
from modelpress.errors import ConfigError, RecipeError
from modelpress.nn import CompressedEmbedding, CompressedLinear
from modelpress.passes import RangeSearch, RTNConfig, WeightQuant
from modelpress.presets import DEFAULT_PRESET, preset, preset_names
from modelpress.recipe import RECIPE_VERSION, Recipe, Selector, Stage

CUSTOM = textwrap.dedent(
    """\
    version: 1
    name: mixed
    stages:
      - pass: rtn
        targets: {types: [Linear, Embedding], include: ["*"], ignore: ["pooler.*"]}
        config: {bits: 4, symmetric: false, group_size: 64, search: mse}
        overrides: {"embeddings.word_embeddings": {group_size: 32}, "*.out": {bits: 8, symmetric: true}}
      - pass: dynamic_int8
        targets: {include: "pooler.*"}
        config: {weight_bits: 8, group_size: tensor}
    """
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 64), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


# ---------------------------------------------------------------- parsing and round trips


def test_custom_recipe_parses_into_typed_stages():
    r = Recipe.from_yaml(CUSTOM)
    assert r.name == "mixed" and r.version == RECIPE_VERSION == 1
    first, second = r.stages
    assert first.pass_name == "rtn"
    assert first.config == RTNConfig(bits=4, symmetric=False, group_size=64, search="mse")
    assert first.config.quant.search is RangeSearch.MSE
    assert first.targets == Selector(include=("*",), types=("Linear", "Embedding"), ignore=("pooler.*",))
    assert first.overrides == (("embeddings.word_embeddings", {"group_size": 32}), ("*.out", {"bits": 8, "symmetric": True}))
    assert second.targets.include == ("pooler.*",)  # a single string is a one-item list
    assert second.config.weight_bits == 8


def test_config_for_applies_matching_overrides_in_order():
    stage = Recipe.from_yaml(CUSTOM).stages[0]
    assert stage.config_for("encoder.dense") == stage.config
    assert stage.config_for("embeddings.word_embeddings").quant.group_size == 32
    attn_out = stage.config_for("attention.out")
    assert attn_out.quant == WeightQuant(bits=8, symmetric=True, group_size=64, search=RangeSearch.MSE)


@pytest.mark.parametrize("name", sorted(preset_names()) + ["custom"])
def test_yaml_round_trip(name):
    r = Recipe.from_yaml(CUSTOM) if name == "custom" else preset(name)
    text = r.to_yaml()
    assert yaml.safe_load(text) == r.to_dict()  # plain YAML, no python tags
    back = Recipe.from_yaml(text)
    assert back.to_dict() == r.to_dict()
    assert back == r
    assert Recipe.from_dict(r.to_dict()) == r


def test_to_dict_is_explicit():
    assert preset("int8").to_dict() == {
        "version": 1,
        "name": "int8",
        "stages": [{
            "pass": "rtn",
            "config": {"bits": 8, "symmetric": True, "group_size": "channel", "search": "minmax", "kernel": "auto",
                       "version": 1},
            "targets": {"include": ["*"], "types": ["Linear", "Embedding"], "ignore": []},
        }],
    }


def test_defaults():
    r = Recipe.from_dict({"stages": [{"pass": "rtn"}]})
    assert r.name == "custom" and r.version == 1
    assert r.stages[0].config == RTNConfig() and r.stages[0].targets == Selector() and r.stages[0].overrides == ()


PRESETS = ["int3", "int4", "int8", "llm-int8", "llm-q3", "llm-q4", "llm-w8a8", "w8a8", "w8a8-smooth", "w8a8-token"]


def test_preset_registry():
    assert DEFAULT_PRESET in preset_names()
    assert sorted(preset_names()) == PRESETS
    with pytest.raises(RecipeError, match=re.escape(f"unknown preset 'int5': use one of {PRESETS}")):
        preset("int5")


# ---------------------------------------------------------------- invalid recipes


def stage(**fields):
    return {"stages": [{"pass": "rtn", **fields}]}


INVALID = [
    ("not-a-mapping", ["rtn"], "a recipe must be a mapping with 'stages'"),
    ("none", None, "a recipe must be a mapping"),
    ("unknown-top-field", {"stages": [{"pass": "rtn"}], "stagez": []}, r"unknown recipe field\(s\) \['stagez'\]"),
    ("version-2", {"version": 2, "stages": [{"pass": "rtn"}]}, "recipe version 2 is not supported: this modelpress reads version 1"),
    ("version-string", {"version": "1", "stages": [{"pass": "rtn"}]}, "recipe version '1' is not supported"),
    ("no-stages", {"name": "x"}, "a recipe needs 'stages': a non-empty list of passes"),
    ("empty-stages", {"stages": []}, "non-empty list"),
    ("stages-mapping", {"stages": {"pass": "rtn"}}, "non-empty list"),
    ("stage-not-mapping", {"stages": ["rtn"]}, r"stage 0: each stage must be a mapping"),
    ("missing-pass", {"stages": [{"config": {}}]}, r"stage 0: missing 'pass'"),
    ("unknown-pass", {"stages": [{"pass": "rtn"}, {"pass": "gptq9"}]}, r"unknown pass 'gptq9': use one of \[.*'dynamic_int8'.*'rtn'"),
    ("unknown-stage-field", stage(target={}), r"stage 0: unknown field\(s\) \['target'\]; allowed are pass, config, targets, overrides, optional"),
    ("unknown-config-field", stage(config={"bitz": 4}), r"stage 0 \(rtn\): unknown field\(s\) \['bitz'\]; allowed fields are"),
    ("config-not-mapping", stage(config=[4]), r"stage 0 \(rtn\): config must be a mapping, got list"),
    ("bad-enum", stage(config={"search": "foo"}), r"stage 0 \(rtn\): search='foo' is not valid; use one of \['minmax', 'mse'\]"),
    ("bad-kernel", stage(config={"kernel": "fast"}), r"kernel='fast' is not valid; use one of \['auto', 'dense'"),
    ("bits-5", stage(config={"bits": 5}), r"stage 0 \(rtn\): unsupported bit width 5: use one of \(2, 3, 4, 8\)"),
    ("symmetric-2bit", stage(config={"bits": 2}), "2-bit symmetric quantisation has only 3 levels"),
    ("bad-granularity", stage(config={"group_size": "rows"}), "group_size 'rows' is not valid"),
    ("rtn-dynamic-kernel", stage(config={"kernel": "dynamic_int8"}), "or the dynamic_int8 pass for W8A8"),
    ("dynamic-weight-bits", {"stages": [{"pass": "dynamic_int8", "config": {"weight_bits": 4}}]},
     r"stage 0 \(dynamic_int8\): weight_bits 4 is not valid"),
    ("dynamic-groups", {"stages": [{"pass": "dynamic_int8", "config": {"group_size": 64}}]}, "fbgemm has no groups"),
    ("dynamic-unknown-field", {"stages": [{"pass": "dynamic_int8", "config": {"bits": 4}}]}, r"unknown field\(s\) \['bits'\]"),
    ("targets-not-mapping", stage(targets=["*"]), r"stage 0 \(rtn\): targets must be a mapping with include/types/ignore"),
    ("targets-unknown-field", stage(targets={"exclude": ["x"]}), r"unknown target field\(s\) \['exclude'\]"),
    ("targets-not-strings", stage(targets={"include": [1]}), r"targets.include must be a list of strings"),
    ("targets-types-mapping", stage(targets={"types": {"Linear": 1}}), r"targets.types must be a list of strings"),
    ("overrides-not-mapping", stage(overrides=["head"]), r"overrides must map module-name patterns to config changes"),
    ("override-unknown-field", stage(overrides={"head": {"bitz": 4}}), r"stage 0 \(rtn\) override 'head': unknown field"),
    ("override-bad-bits", stage(overrides={"head": {"bits": 7}}), r"override 'head': unsupported bit width 7"),
    ("override-bad-enum", stage(overrides={"head": {"search": "best"}}), r"override 'head': search='best' is not valid"),
]


@pytest.mark.parametrize(("data", "message"), [pytest.param(d, m, id=i) for i, d, m in INVALID])
def test_invalid_recipe_dict(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


@pytest.mark.parametrize(("data", "message"), [pytest.param(d, m, id=i) for i, d, m in INVALID if d is not None])
def test_invalid_recipe_yaml(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(yaml.safe_dump(data))


def test_recipe_error_is_a_config_error_and_value_error():
    with pytest.raises(ConfigError):
        Recipe.from_dict(stage(config={"bits": 5}))
    with pytest.raises(ValueError):
        Recipe.from_dict(stage(config={"bits": 5}))


def test_a_recipe_needs_a_stage():
    with pytest.raises(RecipeError, match="a recipe needs at least one stage"):
        Recipe(stages=())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: [", r"recipe is not valid YAML: "),
        ("stages:\n  - pass: rtn\n bad: indent", "recipe is not valid YAML"),
        ("", "a recipe must be a mapping"),
        ("just a string", "a recipe must be a mapping"),
        ("!!python/object/apply:os.system [echo hi]", "recipe is not valid YAML"),  # safe_load only
    ],
)
def test_invalid_yaml(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(stage(overrides={"head": 5}), id="override-not-mapping"),
        pytest.param(stage(overrides={"head": "bits=4"}), id="override-string"),
        pytest.param({"stages": [{"pass": ["rtn"]}]}, id="pass-list"),
        pytest.param(stage(config={"symmetric": "false"}), id="symmetric-string"),
        pytest.param(stage(config={"bits": 4.0}), id="bits-float"),
    ],
)
def test_malformed_values_raise_recipe_error(data):
    with pytest.raises(RecipeError):
        Recipe.from_dict(data)


# ---------------------------------------------------------------- files


def test_from_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(CUSTOM, encoding="utf-8")
    assert Recipe.from_file(path) == Recipe.from_yaml(CUSTOM)
    assert Recipe.from_file(str(path)) == Recipe.from_yaml(CUSTOM)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=r"cannot read recipe file '.*nope.yaml': No such file or directory"):
        Recipe.from_file(path)


def test_directory_is_not_a_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe file"):
        Recipe.from_file(tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nstages: [{pass: rtn}]\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="cannot read recipe file"):
        Recipe.from_file(path)


# ---------------------------------------------------------------- compress() entry points


def compressed_names(m: nn.Module) -> set[str]:
    return {n for n, x in m.named_modules() if isinstance(x, (CompressedLinear, CompressedEmbedding))}


def test_compress_with_a_preset_name():
    m = compress(model(), "int8")
    assert compressed_names(m) == {"0", "1", "3"}
    assert provenance(m).recipe == preset("int8").to_dict()


@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_compress_with_a_yaml_path(tmp_path, as_str):
    path = tmp_path / "r.yml"
    path.write_text(
        "name: from-file\nstages:\n  - pass: rtn\n    targets: {types: [Linear]}\n"
        "    config: {bits: 4, symmetric: false, group_size: 32}\n"
        "    overrides: {'3': {bits: 8, symmetric: true, group_size: channel}}\n",
        encoding="utf-8",
    )
    m = compress(model(), str(path) if as_str else path)
    assert compressed_names(m) == {"1", "3"}
    assert m[1].encoding.scheme.describe() == "int4 asym g32"
    assert m[3].encoding.scheme.describe() == "int8 sym per-channel"
    assert provenance(m).recipe_name == "from-file"
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, 16)


def test_compress_with_a_dict_and_a_recipe():
    data = {"stages": [{"pass": "rtn", "targets": {"types": ["Embedding"]}}]}
    assert compressed_names(compress(model(), data)) == {"0"}
    assert compressed_names(compress(model(), Recipe.from_dict(data))) == {"0"}


@pytest.mark.parametrize("name", sorted(preset_names()))
def test_resolve_preset_name(name):
    assert resolve_recipe(name) == preset(name)


def test_resolve_missing_yaml_path(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file '.*missing.yaml' does not exist: give a preset"):
        compress(model(), tmp_path / "missing.yaml")


def test_resolve_directory(tmp_path):
    with pytest.raises(RecipeError, match="does not exist: give a preset"):
        resolve_recipe(tmp_path)


def test_resolve_unknown_preset():
    with pytest.raises(RecipeError, match=re.escape(f"unknown preset 'int2': use one of {PRESETS} or a recipe")):
        compress(model(), "int2")


def test_failed_resolution_leaves_the_model_untouched():
    m = model()
    with pytest.raises(RecipeError):
        compress(m, {"stages": [{"pass": "rtn", "config": {"bits": 5}}]})
    assert compressed_names(m) == set() and provenance(m).recipe is None


def test_stage_to_dict_omits_empty_overrides():
    s = Stage.from_dict({"pass": "rtn"}, 0)
    assert "overrides" not in s.to_dict()


# ---------------------------------------------------------------------------------------------- configs by type


def test_a_stage_whose_config_is_not_its_passes_is_refused():
    from modelpress.passes import GPTQConfig

    with pytest.raises(RecipeError, match=r"stage 'gptq' takes a GPTQConfig, not a RTNConfig: use Stage.of"):
        Stage("gptq", RTNConfig())
    with pytest.raises(RecipeError, match="unknown pass 'gptq4'"):
        Stage("gptq4", GPTQConfig())
    assert Stage("gptq", GPTQConfig()).pass_name == "gptq"


def test_stage_of_finds_the_pass_from_the_config_type():
    from modelpress.passes import GPTQConfig, KMeansConfig, PruneHeadsConfig

    assert Stage.of(GPTQConfig(bits=3)) == Stage("gptq", GPTQConfig(bits=3))
    assert Stage.of(KMeansConfig(bits=2)).pass_name == "kmeans"
    assert Stage.of(PruneHeadsConfig(ratio=0.5), Selector(include=("encoder.*",))).targets.include == ("encoder.*",)


def test_a_recipe_from_one_config_selects_everything_its_pass_handles():
    recipe = Recipe.from_configs(RTNConfig(bits=4, group_size=16))
    assert recipe.name == "rtn" and recipe.stages == (Stage("rtn", RTNConfig(bits=4, group_size=16)),)
    assert recipe.to_dict() == Recipe.from_dict({"name": "rtn", "stages": [{"pass": "rtn", "config": {
        "bits": 4, "group_size": 16}}]}).to_dict()


def test_a_pattern_map_is_one_stage_per_config_each_ignoring_every_earlier_pattern():
    from modelpress.passes import GPTQConfig

    recipe = Recipe.from_configs({"*.pooler.*": None, "embeddings.*": RTNConfig(bits=8), "*": GPTQConfig(bits=4)})
    assert [s.pass_name for s in recipe.stages] == ["rtn", "gptq"]
    assert recipe.stages[0].targets == Selector(include=("embeddings.*",), ignore=("*.pooler.*",))
    assert recipe.stages[1].targets == Selector(include=("*",), ignore=("*.pooler.*", "embeddings.*"))
    assert recipe.name == "custom"


@pytest.mark.parametrize("configs, message", [
    ({"*": None}, "leaves every module as it is"),
    ({}, "give a pass config"),
    ({"*": {"bits": 4}}, "give a pass config"),
    ({3: RTNConfig()}, "give a pass config"),
])
def test_bad_pattern_maps_are_refused(configs, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_configs(configs)
