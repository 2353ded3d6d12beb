"""The rtn and dynamic_int8 passes through compress(): presets, selectors, overrides, stage order,
and errors, on a tiny model with Linear and Embedding layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.nn.provenance import provenance
from modelpress.compress import compress
from modelpress.encodings import PER_CHANNEL, PER_TENSOR, QuantizedTensor, QuantScheme, mse_params, quantize
from modelpress.errors import ConfigError, RecipeError
from modelpress.nn import CompressedEmbedding, CompressedLinear, Kernel
from modelpress.passes import PASSES, DynamicInt8Config, RangeSearch, RTNConfig, pass_for

LINEARS = {"block.0", "block.2", "head"}
EMBEDDINGS = {"embed", "pos"}


class Tiny(nn.Module):
    """Two embeddings, an MLP block, a LayerNorm and a head; every input width is 64."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 64)
        self.pos = nn.Embedding(16, 64)
        self.block = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 16)
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[-1]))
        return self.head(self.norm(h + self.block(h)))


IDS = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))


def replaced(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (CompressedLinear, CompressedEmbedding))}


def scheme_of(model: nn.Module, name: str) -> QuantScheme:
    enc = model.get_submodule(name).encoding
    assert isinstance(enc, QuantizedTensor)
    return enc.scheme


def rtn_stage(targets=None, overrides=None, **config):
    stage = {"pass": "rtn", "config": config}
    if targets is not None:
        stage["targets"] = targets
    if overrides is not None:
        stage["overrides"] = overrides
    return stage


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).min().item()


# ---------------------------------------------------------------- registry


def test_passes_are_registered_with_their_configs():
    assert pass_for("rtn").config_type is RTNConfig
    assert pass_for("dynamic_int8").config_type is DynamicInt8Config
    assert set(PASSES["rtn"].module_types) == {nn.Linear, nn.Embedding, nn.Conv2d}
    assert PASSES["dynamic_int8"].module_types == (nn.Linear,)


def test_unknown_pass_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"unknown pass 'warp': use one of \[.*'dynamic_int8', .*'rtn'"):
        pass_for("warp")


# ---------------------------------------------------------------- presets

PRESET_SCHEMES = {
    # preset: (linear scheme, embedding scheme, linear kernel, min output cosine vs float)
    "int8": (QuantScheme(8, True, PER_CHANNEL), QuantScheme(8, True, PER_CHANNEL), Kernel.AUTO, 0.999),
    "w8a8": (QuantScheme(8, True, PER_CHANNEL), QuantScheme(8, True, PER_CHANNEL), Kernel.DYNAMIC_INT8, 0.99),
    "int4": (QuantScheme(4, False, 32), QuantScheme(4, False, 64), Kernel.AUTO, 0.95),
    "int3": (QuantScheme(3, False, 64), QuantScheme(3, False, 64), Kernel.AUTO, 0.85),
}


@pytest.mark.parametrize("name", PRESET_SCHEMES)
def test_preset_replaces_exactly_linear_and_embedding_layers(name):
    linear_scheme, embedding_scheme, kernel, min_cosine = PRESET_SCHEMES[name]
    model = Tiny()
    with torch.no_grad():
        before = model(IDS)
    out = compress(model, name)
    assert out is model
    swapped = replaced(model)
    assert set(swapped) == LINEARS | EMBEDDINGS
    assert all(isinstance(swapped[n], CompressedLinear) for n in LINEARS)
    assert all(isinstance(swapped[n], CompressedEmbedding) for n in EMBEDDINGS)
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.block[1], nn.ReLU)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    for n in LINEARS:
        assert scheme_of(model, n) == linear_scheme
        assert model.get_submodule(n).kernel is kernel
    for n in EMBEDDINGS:
        assert scheme_of(model, n) == embedding_scheme
    with torch.no_grad():
        after = model(IDS)
    assert after.shape == before.shape
    assert cosine(after, before) > min_cosine
    assert provenance(model).recipe_name == name
    assert len(provenance(model).log) == 5


def test_int8_preset_is_plain_minmax_rtn():
    reference = Tiny()
    model = compress(Tiny(), "int8")
    for n in LINEARS | EMBEDDINGS:
        expected = quantize(reference.get_submodule(n).weight.data, QuantScheme(8)).decode()
        assert torch.equal(model.get_submodule(n).weight, expected)
    assert torch.equal(model.head.bias, reference.head.bias.data)


@pytest.mark.parametrize("name", ["int4", "int3"])
def test_mse_presets_use_searched_ranges(name):
    reference = Tiny()
    model = compress(Tiny(), name)
    for n in LINEARS | EMBEDDINGS:
        w = reference.get_submodule(n).weight.data
        scheme = scheme_of(model, n)
        searched = quantize(w, scheme, *mse_params(w, scheme)).decode()
        assert torch.equal(model.get_submodule(n).weight, searched)
        assert (w - searched).pow(2).sum() <= (w - quantize(w, scheme).decode()).pow(2).sum()


def test_w8a8_stores_seven_bit_weights_and_int8_embeddings():
    model = compress(Tiny(), "w8a8")
    for n in LINEARS:
        codes = model.get_submodule(n).encoding.int_codes().to(torch.int16) - 128
        assert codes.abs().max() == 63  # weight_bits=7: |q| <= 63, and the range is used
    for n in EMBEDDINGS:
        codes = model.get_submodule(n).encoding.int_codes().to(torch.int16) - 128
        assert codes.abs().max() == 127


@pytest.mark.parametrize(
    "name",
    ["int8", "int3",
     pytest.param("int4"),
     pytest.param("w8a8")],
)
def test_presets_apply_to_a_model_without_embeddings(name):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    compress(model, name)
    assert set(replaced(model)) == {"0", "2"}


def test_int4_preset_runs_a_layer_with_ten_outputs():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 10))
    compress(model, "int4")
    assert model(torch.tensor([1, 2])).shape == (2, 10)


def test_int8_preset_runs_a_layer_with_twenty_inputs():
    model = nn.Sequential(nn.Linear(20, 4))
    compress(model, "int8")
    assert model(torch.zeros(1, 20)).shape == (1, 4)


# ---------------------------------------------------------------- selectors


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ({"include": ["block.*"]}, {"block.0", "block.2"}),
        ({"include": ["block.*"], "ignore": ["block.2"]}, {"block.0"}),
        ({"include": "head"}, {"head"}),
        ({"types": ["Embedding"]}, EMBEDDINGS),
        ({"types": ["Linear"], "ignore": ["head"]}, {"block.0", "block.2"}),
        ({"types": ["Linear", "Embedding"], "ignore": ["*.0", "pos"]}, {"block.2", "head", "embed"}),
        ({"include": ["*"]}, LINEARS | EMBEDDINGS),
        ({"include": ["e*", "h*"]}, {"embed", "head"}),
        ({"include": ["block"]}, None),  # the container itself is not a Linear
        ({"include": ["norm"]}, None),  # LayerNorm is not a type rtn handles
        ({"types": ["LayerNorm"]}, None),
        ({"types": ["linear"]}, None),  # class names are case-sensitive
        ({"include": ["*"], "ignore": ["*"]}, None),
        ({"include": ["Head"]}, None),  # so are module-name patterns
    ],
)
def test_selectors(targets, expected):
    model = Tiny()
    recipe = {"stages": [rtn_stage(targets, bits=8)]}
    if expected is None:
        with pytest.raises(RecipeError, match=r"stage 0 \(rtn\) matched no module: check its targets"):
            compress(model, recipe)
        assert replaced(model) == {}
    else:
        compress(model, recipe)
        assert set(replaced(model)) == expected


def test_dynamic_int8_only_takes_linear_layers():
    model = Tiny()
    compress(model, {"stages": [{"pass": "dynamic_int8", "targets": {"include": ["*"]}}]})
    assert set(replaced(model)) == LINEARS


def test_unmatched_stage_names_example_modules():
    with pytest.raises(RecipeError, match=r"module names look like 'embed', 'pos', 'block.0'"):
        compress(Tiny(), {"stages": [rtn_stage({"include": ["encoder.*"]})]})


# ---------------------------------------------------------------- overrides and stage order


def test_overrides_apply_per_layer():
    model = compress(Tiny(), {"stages": [rtn_stage(
        overrides={"head": {"bits": 4, "symmetric": False, "group_size": 32}, "block.*": {"group_size": "tensor"}},
        bits=8)]})
    assert scheme_of(model, "head") == QuantScheme(4, False, 32)
    assert scheme_of(model, "block.0") == QuantScheme(8, True, PER_TENSOR)
    assert scheme_of(model, "block.2") == QuantScheme(8, True, PER_TENSOR)
    assert scheme_of(model, "embed") == QuantScheme(8, True, PER_CHANNEL)


def test_later_overrides_refine_earlier_ones():
    model = compress(Tiny(), {"stages": [rtn_stage(
        {"types": ["Linear"]},
        overrides={"block.*": {"bits": 4, "symmetric": False}, "block.2": {"group_size": 16}, "*.9": {"bits": 2, "symmetric": False}},
        bits=8)]})
    assert scheme_of(model, "block.0") == QuantScheme(4, False, PER_CHANNEL)
    assert scheme_of(model, "block.2") == QuantScheme(4, False, 16)
    assert scheme_of(model, "head") == QuantScheme(8, True, PER_CHANNEL)


def test_override_can_change_search_and_kernel():
    model = compress(Tiny(), {"stages": [rtn_stage(
        {"types": ["Linear"]}, overrides={"head": {"search": "mse", "kernel": "decode"}}, bits=8)]})
    assert model.head.kernel is Kernel.DECODE_PER_CALL and model.block[0].kernel is Kernel.AUTO
    w = Tiny().head.weight.data
    assert torch.equal(model.head.weight, quantize(w, QuantScheme(8), *mse_params(w, QuantScheme(8))).decode())


def test_first_stage_that_selects_a_module_wins():
    model = compress(Tiny(), {"stages": [
        rtn_stage({"include": ["head"]}, bits=4, symmetric=False, group_size=32),
        rtn_stage({"types": ["Linear"]}, bits=8),
    ]})
    assert scheme_of(model, "head") == QuantScheme(4, False, 32)
    assert scheme_of(model, "block.0") == QuantScheme(8, True, PER_CHANNEL)
    assert set(replaced(model)) == LINEARS


def test_a_later_stage_left_with_nothing_is_an_error():
    with pytest.raises(RecipeError, match=r"stage 1 \(dynamic_int8\) matched no module"):
        compress(Tiny(), {"stages": [rtn_stage({"types": ["Linear"]}), {"pass": "dynamic_int8"}]})


def test_rtn_kernel_choice_reaches_the_module():
    model = compress(Tiny(), {"stages": [rtn_stage({"types": ["Linear"]}, bits=8, kernel="int8_mm")]})
    assert all(model.get_submodule(n).kernel is Kernel.INT8_WEIGHT_MM for n in LINEARS)
    with torch.no_grad():
        model(IDS)
    assert all(model.get_submodule(n).resolved_kernel is Kernel.INT8_WEIGHT_MM for n in LINEARS)


def test_rtn_kernel_that_cannot_run_the_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="kernel 'int4_mm' cannot run"):
        compress(Tiny(), {"stages": [rtn_stage({"types": ["Linear"]}, bits=8, kernel="int4_mm")]})


@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_group_size_that_does_not_divide_names_the_layer(search):
    recipe = {"stages": [rtn_stage({"types": ["Linear"]}, overrides={"head": {"group_size": 48}},
                                   bits=4, symmetric=False, group_size=32, search=search)]}
    with pytest.raises(ConfigError, match=r"layer 'head': group size 48 does not divide the input width 64") as info:
        compress(Tiny(), recipe)
    assert not isinstance(info.value, RecipeError)  # the recipe is valid; this model's layer is not


@pytest.mark.parametrize(("weight_bits", "max_code"), [(7, 63), (8, 127)])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_dynamic_int8_pass(weight_bits, max_code, granularity):
    model = compress(Tiny(), {"stages": [{"pass": "dynamic_int8", "targets": {"include": ["block.*"]},
                                          "config": {"weight_bits": weight_bits, "group_size": granularity,
                                                     "search": "minmax"}}]})
    assert set(replaced(model)) == {"block.0", "block.2"}
    layer = model.block[0]
    assert layer.kernel is Kernel.DYNAMIC_INT8
    assert layer.encoding.scheme == QuantScheme(8, True, granularity)
    codes = layer.encoding.int_codes().to(torch.int16) - 128
    assert codes.abs().max() == max_code
    with torch.no_grad():
        assert model(IDS).shape == (4, 16, 16)


def test_progress_and_log():
    messages = []
    model = compress(Tiny(), "int4", progress=messages.append)
    assert messages == ["stage 0: rtn on 3 modules", "stage 1: rtn on 2 modules"]
    assert "head: int4 asym g32 (mse)" in provenance(model).log
    assert "embed: int4 asym g64 (mse)" in provenance(model).log


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, "unsupported bit width 5"),
        ({"bits": 2}, "2-bit symmetric"),
        ({"group_size": "row"}, "group_size 'row' is not valid"),
        ({"search": "foo"}, "search 'foo' is not valid: use one of \\['minmax', 'mse'\\]"),
        ({"kernel": "dynamic_int8"}, "or the dynamic_int8 pass for W8A8"),
        ({"kernel": "dynamic_int8_token"}, "or the dynamic_int8 pass for W8A8"),
    ],
)
def test_rtn_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RTNConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"weight_bits": 6}, "weight_bits 6 is not valid for dynamic int8: use 7 or 8"),
     ({"group_size": 32}, "fbgemm has no groups"),
     ({"group_size": "row"}, "group_size 'row' is not valid")],
)
def test_dynamic_int8_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DynamicInt8Config(**kwargs)


def test_configs_normalise_enum_strings():
    cfg = RTNConfig(search="mse", kernel="int4_mm", bits=4, symmetric=False, group_size=32)
    assert cfg.quant.search is RangeSearch.MSE and cfg.kernel is Kernel.INT4_WEIGHT_MM
    assert cfg.quant.scheme == QuantScheme(4, False, 32)
    assert DynamicInt8Config(group_size="tensor").quant.scheme == QuantScheme(8, True, PER_TENSOR)
