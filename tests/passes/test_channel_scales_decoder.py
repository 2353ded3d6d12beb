"""The Llama-family producer map of channel scales: every site it names leaves a tiny decoder's
logits unchanged under random scales (against the unscaled model), q/k/v and gate/up share their
RMSNorm, down_proj folds into up_proj's rows, o_proj into v_proj's rows only without grouped-query
attention, and norms it cannot fold are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.errors import UnsupportedError
from modelpress.passes.channel_scales import (Absorber, Site, decoder_blocks, find_sites, fold_into_rmsnorm,
                                              input_multiply, migrate, share_groups)

transformers = pytest.importorskip("transformers")

from _tiny_decoders import ids, logits, tiny_decoder  # noqa: E402


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def scale_all(model: nn.Module, names: list[str], seed: int = 0) -> dict[str, Site]:
    """Migrate a random scale (0.05..4.05) into every share group of `names`; explicit layers multiply."""
    sites = find_sites(model, names)
    inverses = {}
    for i, group in enumerate(share_groups(names, sites)):
        g = torch.Generator().manual_seed(seed + i)
        s = torch.rand(model.get_submodule(group[0]).in_features, generator=g) * 4 + 0.05
        inverse = migrate(model, group, sites[group[0]], s)
        if inverse is not None:
            inverses.update(dict.fromkeys(group, inverse))
    for name, inverse in inverses.items():
        input_multiply(model, name, inverse)
    return sites


def test_the_map_names_each_llama_layer_its_absorber():
    model = tiny_decoder("llama", heads=4, kv_heads=2)
    assert decoder_blocks(model) == ["model.layers.0", "model.layers.1"]
    sites = find_sites(model, block_linears(model))
    for b in ("model.layers.0", "model.layers.1"):
        for p in ("q_proj", "k_proj", "v_proj"):
            assert (sites[f"{b}.self_attn.{p}"].absorber, sites[f"{b}.self_attn.{p}"].producer) == (
                Absorber.RMSNORM, f"{b}.input_layernorm")
        for p in ("gate_proj", "up_proj"):
            assert (sites[f"{b}.mlp.{p}"].absorber, sites[f"{b}.mlp.{p}"].producer) == (
                Absorber.RMSNORM, f"{b}.post_attention_layernorm")
        down = sites[f"{b}.mlp.down_proj"]
        assert (down.absorber, down.producer) == (Absorber.LINEAR_ROWS, f"{b}.mlp.up_proj")
        o = sites[f"{b}.self_attn.o_proj"]
        assert o.absorber is Absorber.EXPLICIT and "grouped-query" in o.why
    assert find_sites(model, ["lm_head"])["lm_head"].absorber is Absorber.EXPLICIT
    groups = share_groups(block_linears(model)[:7], sites)
    assert groups[0] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]


def test_without_grouped_query_attention_o_proj_folds_into_the_value_rows():
    model = tiny_decoder("llama", heads=4, kv_heads=4)
    o = find_sites(model, ["model.layers.1.self_attn.o_proj"])["model.layers.1.self_attn.o_proj"]
    assert (o.absorber, o.producer) == (Absorber.LINEAR_ROWS, "model.layers.1.self_attn.v_proj")


@pytest.mark.parametrize("arch, heads, kv_heads", [("llama", 4, 2), ("llama", 4, 4), ("mistral", 4, 1),
                                                   ("qwen2", 4, 2)])
def test_random_scales_at_every_site_leave_the_logits_unchanged(arch, heads, kv_heads):
    model = tiny_decoder(arch, heads=heads, kv_heads=kv_heads)
    x = ids()
    before = logits(model, x)
    scaled = copy.deepcopy(model)
    sites = scale_all(scaled, block_linears(scaled))
    assert {s.absorber for s in sites.values()} >= {Absorber.RMSNORM, Absorber.LINEAR_ROWS}
    for name, site in sites.items():  # the scale really moved: the weights differ from the original's
        if site.absorber is not Absorber.EXPLICIT:
            assert not torch.allclose(scaled.get_submodule(name).weight, model.get_submodule(name).weight)
    after = logits(scaled, x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4), (after - before).abs().max()


def test_a_wrong_absorber_changes_the_logits():
    """The test above can fail: folding q/k/v's scale into the other norm changes the model."""
    model = tiny_decoder("llama")
    x = ids()
    before = logits(model, x)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    wrong = Site(Absorber.RMSNORM, "model.layers.0.post_attention_layernorm", "not valid")
    migrate(model, names, wrong, torch.rand(64, generator=torch.Generator().manual_seed(1)) * 4 + 0.05)
    assert not torch.allclose(logits(model, x), before, rtol=1e-3, atol=1e-3)


def test_fold_into_rmsnorm_divides_the_weight_and_refuses_other_norms():
    model = tiny_decoder("llama")
    norm = model.model.layers[0].input_layernorm
    w = norm.weight.detach().clone()
    s = torch.linspace(0.5, 2.0, 64)
    fold_into_rmsnorm(norm, s)
    assert torch.equal(norm.weight.detach(), w / s)
    with pytest.raises(UnsupportedError, match="RMSNorm"):
        fold_into_rmsnorm(nn.LayerNorm(64), s)
    with pytest.raises(UnsupportedError, match="RMSNorm"):
        fold_into_rmsnorm(norm, torch.ones(32))
