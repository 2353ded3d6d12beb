"""SwiGLU neurons and grouped-query heads of Llama-family decoders: dead units go without changing the
logits, the Linear layers and the config really shrink, a model rebuilt from the config loads the
pruned weights and generates the same tokens, importance against plain references, calibrated
importance and refits, refusals."""

from __future__ import annotations

import pytest
import torch

import modelpress
from modelpress.errors import ConfigError
from modelpress.passes.structured import gqa_head_importance, keep_units
from modelpress.passes.structured.config import GQAMode, UnitImportance

transformers = pytest.importorskip("transformers")

from _tiny_decoders import ids, logits, tiny_decoder, windows  # noqa: E402


def stage(pass_name: str, include: list[str] | None = None, **config) -> dict:
    s = {"pass": pass_name, "config": config}
    if include:
        s["targets"] = {"include": include}
    return {"stages": [s]}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def rebuilt(model, tmp_path):
    """The pruned model saved by transformers (safetensors) and rebuilt from its own config."""
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path, dtype=torch.float32).eval()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- SwiGLU neurons


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_removing_dead_swiglu_neurons_keeps_the_logits_and_shrinks_the_config(arch, tmp_path):
    model = tiny_decoder(arch)
    dead = [torch.randperm(128, generator=torch.Generator().manual_seed(i))[:32] for i in range(2)]  # 25%
    with torch.no_grad():
        for layer, idx in zip(model.model.layers, dead):
            layer.mlp.down_proj.weight[:, idx] = 0  # nothing reads these neurons
    x = ids()
    before, count = logits(model, x), params(model)
    modelpress.compress(model, stage("prune_ffn", ratio=0.25))
    for layer, idx in zip(model.model.layers, dead):
        mlp = layer.mlp
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 96
        assert mlp.intermediate_size == 96
        kept = sorted(set(range(128)) - set(idx.tolist()))
        assert len(kept) == 96
    assert model.config.intermediate_size == 96
    assert params(model) == count - 2 * 32 * 3 * 64  # gate rows, up rows, down columns
    assert_same(logits(model, x), before)
    again = rebuilt(model, tmp_path)
    assert_same(logits(again, x), before)


def test_swiglu_importance_is_gate_norm_times_up_norm_times_down_norm():
    model = tiny_decoder("llama")
    mlp = model.model.layers[0].mlp
    gate, up, down = (m.weight.detach().clone() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    expect = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    keep = keep_units(expect, 0.5)
    modelpress.compress(model, stage("prune_ffn", ["model.layers.0.mlp"], ratio=0.5))
    torch.testing.assert_close(mlp.gate_proj.weight, gate[keep])
    torch.testing.assert_close(mlp.up_proj.weight, up[keep])
    torch.testing.assert_close(mlp.down_proj.weight, down[:, keep])
    assert model.model.layers[1].mlp.down_proj.in_features == 128
    assert model.config.intermediate_size == 128  # the widest layer: a load only shrinks


def test_activation_importance_removes_silent_neurons_and_reconstruct_lowers_the_error():
    model = tiny_decoder("llama")
    silent = torch.arange(0, 128, 4)  # 32 neurons whose up projection is zero: act(gate) * 0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[silent] = 0
    x = ids(9)
    before = logits(model, x)
    pruned = modelpress.compress(tiny_copy(model), stage("prune_ffn", ratio=0.25, importance="activation"),
                                 calibration=windows(4))
    assert_same(logits(pruned, x), before)
    # more than the silent ones: on the calibration tokens, the refit reader recovers part of what the
    # removed neurons gave (least squares promises no more than that on a random model)
    calibration = windows(8, length=32)
    seen = torch.cat([w["input_ids"] for w in calibration])
    reference = logits(model, seen)
    plain = modelpress.compress(tiny_copy(model), stage("prune_ffn", ratio=0.6, importance="activation"),
                                calibration=calibration)
    refit = modelpress.compress(tiny_copy(model), stage("prune_ffn", ratio=0.6, importance="activation",
                                                        reconstruct=True), calibration=calibration)
    err_plain = (logits(plain, seen) - reference).pow(2).mean()
    err_refit = (logits(refit, seen) - reference).pow(2).mean()
    assert err_refit < 0.9 * err_plain


def tiny_copy(model):
    import copy

    return copy.deepcopy(model)


# ---------------------------------------------------------------------------------------------- GQA heads


def test_removing_a_dead_key_value_group_keeps_the_logits(tmp_path):
    model = tiny_decoder("llama", heads=6, kv_heads=3, hidden=48)  # 3 groups of 2 query heads of width 8
    attn0 = model.model.layers[0].self_attn
    d = attn0.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            group = i % 3
            layer.self_attn.o_proj.weight[:, group * 2 * d:(group + 1) * 2 * d] = 0  # the group's query heads
    x = ids()
    before = logits(model, x)
    modelpress.compress(model, stage("prune_heads", ratio=0.34, gqa="groups"))
    for layer in model.model.layers:
        a = layer.self_attn
        assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) == (
            4 * d, 2 * d, 2 * d, 4 * d)
        assert a.num_key_value_groups == 2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, d)
    assert_same(logits(model, x), before)
    again = rebuilt(model, tmp_path)
    assert_same(logits(again, x), before)
    prompt = x[:1, :6]
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                       again.generate(prompt, max_new_tokens=8, do_sample=False))


def test_removing_dead_query_heads_from_every_group_keeps_the_logits(tmp_path):
    model = tiny_decoder("qwen2", heads=6, kv_heads=2, hidden=48)  # 2 groups of 3 query heads of width 8
    d = model.model.layers[0].self_attn.head_dim
    dead_heads = [(1, 5), (0, 4)]  # one query head of each group, per layer
    with torch.no_grad():
        for layer, dead in zip(model.model.layers, dead_heads):
            for h in dead:
                layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    x = ids()
    before = logits(model, x)
    modelpress.compress(model, stage("prune_heads", ratio=0.34, gqa="queries"))
    for layer in model.model.layers:
        a = layer.self_attn
        assert a.num_key_value_groups == 2 and a.q_proj.out_features == 4 * d and a.k_proj.out_features == 2 * d
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert_same(logits(model, x), before)
    assert_same(logits(rebuilt(model, tmp_path), x), before)


def test_query_heads_of_only_some_layers_are_refused_before_any_change():
    model = tiny_decoder("llama", heads=4, kv_heads=2)
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(ConfigError, match="query heads per key/value head"):
        modelpress.compress(model, stage("prune_heads", ["model.layers.0.self_attn"], ratio=0.5, gqa="queries"))
    assert [p.shape for p in model.parameters()] == shapes


def test_a_head_count_the_config_cannot_describe_is_refused():
    model = tiny_decoder("llama", heads=4, kv_heads=4)  # hidden 64: 3 heads would not divide it
    with pytest.raises(ConfigError, match="do not divide hidden_size 64"):
        modelpress.compress(model, stage("prune_heads", ratio=0.25, gqa="groups"))
    assert model.model.layers[0].self_attn.q_proj.out_features == 64


def test_group_importance_is_value_norm_times_output_columns_norm():
    model = tiny_decoder("llama", heads=4, kv_heads=2)
    a = model.model.layers[0].self_attn
    d = a.head_dim
    v, o = a.v_proj.weight.detach(), a.o_proj.weight.detach()
    expect = torch.stack([v[j * d:(j + 1) * d].norm() * o[:, j * 2 * d:(j + 1) * 2 * d].norm() for j in range(2)])
    torch.testing.assert_close(gqa_head_importance(a, GQAMode.GROUPS, UnitImportance.L2), expect)
    q = a.q_proj.weight.detach()
    heads = torch.stack([q[h * d:(h + 1) * d].norm() * o[:, h * d:(h + 1) * d].norm() for h in range(4)])
    torch.testing.assert_close(gqa_head_importance(a, GQAMode.QUERIES, UnitImportance.L2), heads.reshape(2, 2))


def test_activation_importance_of_heads_runs_on_calibration():
    model = tiny_decoder("llama", heads=4, kv_heads=2)
    modelpress.compress(model, stage("prune_heads", ratio=0.5, importance="activation", reconstruct=True),
                        calibration=windows(4))
    assert all(layer.self_attn.k_proj.out_features == layer.self_attn.head_dim for layer in model.model.layers)
    assert torch.isfinite(logits(model, ids())).all()


def test_an_already_quantised_mlp_cannot_be_pruned():
    model = tiny_decoder("llama")
    modelpress.compress(model, {"stages": [{"pass": "rtn", "config": {"bits": 8},
                                            "targets": {"include": ["*.down_proj"]}}]})
    with pytest.raises(ConfigError, match="prune before quantising"):
        modelpress.compress(model, stage("prune_ffn", ratio=0.25))
