"""FFN neurons and attention heads: dead units go without changing outputs, importance against plain
references, activation importance and least-squares refits from calibration, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress
from modelpress.nn.provenance import provenance
from modelpress.errors import CalibrationError, ConfigError, RecipeError
from modelpress.nn import CompressedLinear
from modelpress.passes.structured import keep_units, least_squares_reader
from _structured_support import SmallCNN, assert_same, bert_inputs, gen, params, run_bert, stage, tiny_bert  # noqa: E402


# ---------------------------------------------------------------- FFN neurons


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_removing_dead_ffn_neurons_keeps_outputs(importance):
    model = tiny_bert()
    dead = [torch.randperm(64, generator=gen(i))[:19] for i in range(2)]  # 30% of 64 = 19 neurons
    with torch.no_grad():
        for layer, idx in zip(model.encoder.layer, dead):
            layer.output.dense.weight[:, idx] = 0  # nothing reads these neurons
    inputs = bert_inputs()
    before, count = run_bert(model, inputs), params(model)
    modelpress.compress(model, stage("prune_ffn", ratio=0.3, importance=importance))
    for layer, idx in zip(model.encoder.layer, dead):
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 45
        kept = set(range(64)) - set(idx.tolist())
        assert layer.intermediate.dense.weight.shape == (45, 32) and len(kept) == 45
    assert params(model) == count - 2 * 19 * (32 + 1 + 32)  # up rows + up biases + down columns
    assert_same(run_bert(model, inputs), before)


def test_ffn_importance_is_producer_norm_times_reader_norm():
    model = tiny_bert()
    layer = model.encoder.layer[0]
    up, down = layer.intermediate.dense, layer.output.dense
    W = torch.cat([up.weight, up.bias[:, None]], 1).detach()
    expect = W.norm(dim=1) * down.weight.detach().norm(dim=0)
    keep = keep_units(expect, 0.5)
    modelpress.compress(model, {"stages": [{"pass": "prune_ffn", "config": {"ratio": 0.5},
                                            "targets": {"include": ["encoder.layer.0"]}}]})
    torch.testing.assert_close(layer.intermediate.dense.weight, up.weight[keep])
    torch.testing.assert_close(layer.output.dense.weight, down.weight[:, keep])


def test_activation_importance_uses_calibration_and_removes_silent_neurons():
    model = tiny_bert()
    silent = torch.arange(0, 64, 4)  # 16 neurons whose pre-activation is hugely negative: GELU gives ~0
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight[silent] = 0
            layer.intermediate.dense.bias[silent] = -30.0
    calibration = [bert_inputs(seed) for seed in range(3)]
    before = run_bert(model, bert_inputs(9))
    modelpress.compress(model, stage("prune_ffn", ratio=0.25, importance="activation"), calibration=calibration)
    assert all(layer.intermediate.dense.out_features == 48 for layer in model.encoder.layer)
    assert_same(run_bert(model, bert_inputs(9)), before)
    assert not any(layer.intermediate.dense.bias.min() < -29 for layer in model.encoder.layer)


def test_least_squares_reader_matches_lstsq():
    X = torch.randn(200, 12, generator=gen(0), dtype=torch.float64) @ torch.randn(12, 12, generator=gen(1),
                                                                                 dtype=torch.float64)
    W = torch.randn(5, 12, generator=gen(2), dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    got = least_squares_reader(W, X.T @ X, keep, damp=0.0)
    want = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    torch.testing.assert_close(got, want)


def test_reconstruct_refits_the_reader_and_lowers_the_error():
    model, plain = tiny_bert(), tiny_bert()
    calibration = [bert_inputs(seed, batch=8, tokens=16) for seed in range(4)]
    probe = bert_inputs(9, batch=8, tokens=16)
    before = run_bert(model, probe)
    modelpress.compress(model, stage("prune_ffn", ratio=0.5, importance="activation", reconstruct=True),
                        calibration=calibration)
    modelpress.compress(plain, stage("prune_ffn", ratio=0.5, importance="activation"), calibration=calibration)
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
    err = (run_bert(model, probe) - before).norm() / before.norm()
    err_plain = (run_bert(plain, probe) - before).norm() / before.norm()
    assert err < 0.7 * err_plain, (err, err_plain)
    assert any("refitted by least squares" in line for line in provenance(model).log)


def test_channel_pruning_refuses_reconstruct():
    with pytest.raises(ConfigError, match="reconstruct"):
        modelpress.compress(SmallCNN(), stage("prune_channels", ratio=0.5, reconstruct=True))


def test_activation_importance_without_calibration_says_so():
    with pytest.raises(CalibrationError, match="calibration"):
        modelpress.compress(tiny_bert(), stage("prune_ffn", ratio=0.25, importance="activation"))


def test_an_already_quantised_ffn_cannot_be_pruned():
    model = modelpress.compress(tiny_bert(), {"stages": [{"pass": "rtn", "config": {"bits": 8},
                                                          "targets": {"types": ["Linear"]}}]})
    with pytest.raises(ConfigError, match=r"'encoder.layer.0'.*CompressedLinear.*prune before quantising"):
        modelpress.compress(model, stage("prune_ffn", ratio=0.3))


def test_a_model_without_ffn_blocks_matches_nothing():
    with pytest.raises(RecipeError, match="matched no module"):
        modelpress.compress(nn.Sequential(nn.Linear(4, 4)), stage("prune_ffn", ratio=0.3))


def test_structured_then_quantised_in_one_recipe():
    model = tiny_bert()
    modelpress.compress(model, {"stages": [{"pass": "prune_ffn", "config": {"ratio": 0.5}},
                                           {"pass": "rtn", "config": {"bits": 8}, "targets": {"types": ["Linear"]}}]})
    layer = model.encoder.layer[1]
    assert isinstance(layer.intermediate.dense, CompressedLinear) and layer.intermediate.dense.out_features == 32


# ---------------------------------------------------------------- attention heads


@pytest.mark.parametrize("zeroed", ["output", "value"])
def test_removing_dead_heads_keeps_outputs(zeroed):
    model = tiny_bert()
    dead = {0: [1, 3], 1: [0, 2]}
    with torch.no_grad():
        for i, heads in dead.items():
            attn = model.encoder.layer[i].attention
            for h in heads:
                cols = slice(h * 8, (h + 1) * 8)
                if zeroed == "output":
                    attn.output.dense.weight[:, cols] = 0
                else:
                    attn.self.value.weight[cols] = 0
                    attn.self.value.bias[cols] = 0
    inputs = bert_inputs()
    before, count = run_bert(model, inputs), params(model)
    modelpress.compress(model, stage("prune_heads", ratio=0.5))
    for layer in model.encoder.layer:
        sa = layer.attention.self
        assert (sa.num_attention_heads, sa.all_head_size) == (2, 16)
        assert sa.query.out_features == sa.key.out_features == sa.value.out_features == 16
        assert layer.attention.output.dense.in_features == 16
    assert params(model) == count - 2 * 2 * (3 * 8 * (32 + 1) + 8 * 32)
    assert_same(run_bert(model, inputs), before)


def test_heads_keep_at_least_one():
    model = modelpress.compress(tiny_bert(), stage("prune_heads", ratio=0.99))
    assert all(layer.attention.self.num_attention_heads == 1 for layer in model.encoder.layer)
    assert run_bert(model, bert_inputs()).shape == (3, 10, 32)


def test_head_activation_importance():
    model = tiny_bert()
    calibration = [bert_inputs(seed) for seed in range(2)]
    modelpress.compress(model, stage("prune_heads", ratio=0.5, importance="activation"), calibration=calibration)
    assert all(layer.attention.self.num_attention_heads == 2 for layer in model.encoder.layer)
