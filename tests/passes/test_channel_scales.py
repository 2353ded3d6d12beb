"""Channel scales: every absorber and the explicit multiply leave a float model's outputs unchanged
(a tiny transformers BertModel and toy models, against the unscaled model), the BERT map names the
right producer for every layer, and what it refuses is refused with a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.encodings import DenseTensor
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.errors import ConfigError, UnsupportedError
from modelpress.nn import CompressedLinear
from modelpress.passes.channel_scales import (
    Absorber,
    FoldMode,
    Site,
    check_scale,
    find_sites,
    fold_into_layernorm,
    input_multiply,
    migrate,
    share_groups,
)

transformers = pytest.importorskip("transformers")

from _tiny_bert import tiny_bert  # noqa: E402

BERT_LOCAL = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]


def bert_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(0, 100, (3, 10), generator=g), "attention_mask": mask}


def hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def random_scale(channels: int, seed: int) -> torch.Tensor:
    return torch.rand(channels, generator=torch.Generator().manual_seed(seed)) * 4 + 0.05  # (0.05, 4.05)


def scale_all(model: nn.Module, names: list[str], sites: dict[str, Site], seed: int = 0) -> nn.Module:
    """Migrate a random scale for every group of `names`, then give explicit layers their multiply."""
    inverses = {}
    for i, group in enumerate(share_groups(names, sites)):
        s = random_scale(model.get_submodule(group[0]).in_features, seed + i)
        inverse = migrate(model, group, sites[group[0]], s)
        if inverse is not None:
            inverses.update(dict.fromkeys(group, inverse))
    for name, inverse in inverses.items():  # after every fold: a fold needs float producers
        input_multiply(model, name, inverse)
    return model


# ---------------------------------------------------------------------------------------------- the BERT map


def test_bert_map_names_value_for_the_attention_output_and_explicit_for_the_rest():
    model = tiny_bert()
    sites = find_sites(model, linears(model))
    for i in range(2):
        block = f"encoder.layer.{i}"
        out = sites[f"{block}.attention.output.dense"]
        assert (out.absorber, out.producer) == (Absorber.LINEAR_ROWS, f"{block}.attention.self.value")
        for local in BERT_LOCAL:
            if local != "attention.output.dense":
                assert sites[f"{block}.{local}"] == Site(Absorber.EXPLICIT, None, sites[f"{block}.{local}"].why)
    assert sites["pooler.dense"].absorber is Absorber.EXPLICIT
    assert "residual" in sites["encoder.layer.0.attention.self.query"].why
    assert "GELU" in sites["encoder.layer.0.output.dense"].why


@pytest.mark.parametrize("local", BERT_LOCAL + ["pooler"])
@pytest.mark.parametrize("layer", [0, 1])
def test_each_site_alone_leaves_the_float_model_unchanged(local, layer):
    model = tiny_bert()
    name = "pooler.dense" if local == "pooler" else f"encoder.layer.{layer}.{local}"
    reference = hidden(model, bert_inputs())
    scaled = scale_all(model, [name], find_sites(model, [name]), seed=layer)
    torch.testing.assert_close(hidden(scaled, bert_inputs()), reference, rtol=1e-5, atol=1e-5)
    assert isinstance(model.get_submodule(name), CompressedLinear if local != "attention.output.dense" else nn.Linear)


@pytest.mark.parametrize("mode", list(FoldMode))
def test_every_site_together_leaves_the_float_model_unchanged(mode):
    model = tiny_bert()
    reference = hidden(model, bert_inputs())
    names = linears(model)
    scaled = scale_all(model, names, find_sites(model, names, mode))
    out = hidden(scaled, bert_inputs())
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert (out - reference).abs().max() > 0  # the scales really moved (float rounding shows it)


def test_the_value_projection_really_absorbs_the_scale():
    model = tiny_bert()
    value, out = "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense"
    before_v, before_o = model.get_submodule(value).weight.clone(), model.get_submodule(out).weight.clone()
    bias_v = model.get_submodule(value).bias.clone()
    s = random_scale(32, 3)
    assert migrate(model, [out], find_sites(model, [out])[out], s) is None
    torch.testing.assert_close(model.get_submodule(value).weight, before_v / s[:, None])
    torch.testing.assert_close(model.get_submodule(value).bias, bias_v / s)
    torch.testing.assert_close(model.get_submodule(out).weight, before_o * s)


def test_folding_into_a_post_layernorm_would_change_the_model():
    """Why the BERT map keeps q/k/v explicit: the LayerNorm's output is also the residual."""
    model = tiny_bert()
    reference = hidden(model, bert_inputs())
    names = [f"encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")]
    wrong = Site(Absorber.LAYERNORM, "encoder.layer.0.output.LayerNorm", "not valid for BERT")
    migrate(model, names, wrong, random_scale(32, 4))
    assert (hidden(model, bert_inputs()) - reference).abs().max() > 1e-2


def test_a_value_projection_compressed_earlier_makes_the_site_explicit():
    model = tiny_bert()
    value = "encoder.layer.0.attention.self.value"
    model.set_submodule(value, CompressedLinear.from_linear(model.get_submodule(value),
                                                            DenseTensor(model.get_submodule(value).weight.detach())))
    site = find_sites(model, ["encoder.layer.0.attention.output.dense"])["encoder.layer.0.attention.output.dense"]
    assert site.absorber is Absorber.EXPLICIT and "earlier stage" in site.why
    with pytest.raises(UnsupportedError, match="float nn.Linear"):
        migrate(model, ["encoder.layer.0.attention.output.dense"],
                Site(Absorber.LINEAR_ROWS, value, ""), torch.ones(32))


def test_share_groups_ties_layers_with_one_absorber_and_separates_explicit_ones():
    sites = {"q": Site(Absorber.EXPLICIT, None, ""), "k": Site(Absorber.EXPLICIT, None, ""),
             "a": Site(Absorber.LAYERNORM, "ln", ""), "b": Site(Absorber.LAYERNORM, "ln", ""),
             "o": Site(Absorber.LINEAR_ROWS, "v", "")}
    assert share_groups(["q", "a", "k", "b", "o"], sites) == [["q"], ["a", "b"], ["k"], ["o"]]


# ---------------------------------------------------------------------------------------------- other models


class PreNorm(nn.Module):
    """x -> LN -> Linear (the LayerNorm feeds only the Linear) -> Linear -> Linear."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.mid = nn.Linear(2 * dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.down(self.mid(self.up(self.norm(x))))


def prenorm() -> PreNorm:
    torch.manual_seed(0)
    model = PreNorm().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
        model.norm.bias.uniform_(-1.0, 1.0)
    return model


@pytest.mark.parametrize("site, consumer", [
    (Site(Absorber.LAYERNORM, "norm", ""), "up"),
    (Site(Absorber.LINEAR_ROWS, "up", ""), "mid"),
    (Site(Absorber.EXPLICIT, None, ""), "down"),
])
def test_each_absorber_on_a_toy_model_leaves_outputs_unchanged(site, consumer):
    model = prenorm()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    reference = model(x)
    inverse = migrate(model, [consumer], site, random_scale(model.get_submodule(consumer).in_features, 5))
    assert (inverse is None) == (site.absorber is not Absorber.EXPLICIT)
    if inverse is not None:
        input_multiply(model, consumer, inverse)
        assert isinstance(model.get_submodule(consumer).encoding, ChannelScaledTensor)
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


def test_layernorm_fold_divides_weight_and_bias():
    norm = nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.bias.copy_(torch.tensor([4.0, 4.0, 4.0, 4.0]))
    fold_into_layernorm(norm, torch.tensor([1.0, 2.0, 4.0, 8.0]))
    assert norm.weight.tolist() == [1.0, 1.0, 0.75, 0.5] and norm.bias.tolist() == [4.0, 2.0, 1.0, 0.5]
    with pytest.raises(UnsupportedError, match="elementwise_affine"):
        fold_into_layernorm(nn.LayerNorm(4, elementwise_affine=False), torch.ones(4))


def test_an_unknown_architecture_is_refused_unless_explicit():
    model = prenorm()
    with pytest.raises(UnsupportedError, match="fold: explicit"):
        find_sites(model, ["up"])
    sites = find_sites(model, ["up", "mid", "down"], "explicit")
    assert all(s.absorber is Absorber.EXPLICIT for s in sites.values())


@pytest.mark.parametrize("s, message", [
    (torch.ones(15), "16 entries"),
    (torch.ones(16, 1), "16 entries"),
    (torch.tensor([1.0] * 15 + [0.0]), "finite and positive"),
    (torch.tensor([1.0] * 15 + [float("inf")]), "finite and positive"),
    (torch.tensor([1.0] * 15 + [float("nan")]), "finite and positive"),
])
def test_invalid_scales_are_config_errors(s, message):
    with pytest.raises(ConfigError, match=message):
        check_scale(s, 16, "up")
    with pytest.raises(ConfigError, match=message):
        migrate(prenorm(), ["up"], Site(Absorber.LAYERNORM, "norm", ""), s)


def test_explicit_multiply_costs_nothing_in_the_dense_kernel():
    """A decode-once kernel folds 1/s into its float weight: the prepared weight is W itself."""
    model = prenorm()
    w = model.down.weight.detach().clone()
    s = random_scale(32, 6)
    inverse = migrate(model, ["down"], Site(Absorber.EXPLICIT, None, ""), s)
    input_multiply(model, "down", inverse)
    torch.testing.assert_close(model.down.weight, w, rtol=1e-6, atol=1e-7)
    unscaled = copy.deepcopy(model)
    assert unscaled.down.encoding.decode().shape == (16, 32)
