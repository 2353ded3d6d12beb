"""Structured pruning: removing units that provably do nothing keeps outputs identical (up to float
summation order), shapes and parameter counts really shrink, importance scores against plain
references, layers that cannot be pruned are refused, and pruned models save and load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress
from modelpress.nn.provenance import provenance
from modelpress.errors import CalibrationError, ConfigError, FormatError, RecipeError, UnsupportedError
from modelpress.formats.checkpoint import MANIFEST
from digits import DigitsCNN
from modelpress.nn import CompressedLinear
from modelpress.passes.structured import (
    StructuredConfig,
    apply_shapes,
    channel_plan,
    keep_units,
    least_squares_reader,
    record_shapes,
    slice_conv,
    slice_linear,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage(pass_name: str, **config) -> dict:
    return {"stages": [{"pass": pass_name, "config": config}]}


def tiny_bert(seed: int = 0):
    from transformers import AutoModel, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    return AutoModel.from_config(config, attn_implementation="sdpa", add_pooling_layer=False).eval()


def bert_inputs(seed: int = 0, batch: int = 3, tokens: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 60, (batch, tokens), generator=gen(seed))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run_bert(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float summation order (a matmul over fewer terms adds them in another order)."""
    torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item())


# ---------------------------------------------------------------- unit selection and slicing


@pytest.mark.parametrize("ratio, expect", [(0.0, [0, 1, 2, 3, 4, 5]), (0.5, [1, 3, 5]), (0.3, [1, 2, 3, 5]),
                                           (0.99, [5])])
def test_keep_units_drops_the_least_important(ratio, expect):
    importance = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.2, 9.0])
    assert keep_units(importance, ratio).tolist() == expect


@pytest.mark.parametrize("n, ratio, multiple, kept", [(1536, 0.3, 16, 1072), (1536, 0.3, 1, 1075), (1536, 0.25, 64, 1152),
                                                     (10, 0.5, 16, 5), (40, 0.5, 16, 16)])
def test_keep_units_rounds_the_kept_count_down_to_a_multiple(n, ratio, multiple, kept):
    importance = torch.randperm(n).float()
    chosen = keep_units(importance, ratio, multiple)
    assert len(chosen) == kept
    assert set(chosen.tolist()) == set(torch.argsort(importance, descending=True)[:kept].tolist())


def test_multiple_of_must_be_positive():
    with pytest.raises(ConfigError, match="multiple_of 0 is not valid"):
        StructuredConfig(multiple_of=0)


def test_slices_equal_plain_indexing():
    lin = nn.Linear(6, 5)
    rows, cols = torch.tensor([0, 3, 4]), torch.tensor([1, 5])
    new = slice_linear(lin, rows, cols)
    assert torch.equal(new.weight, lin.weight[rows][:, cols]) and torch.equal(new.bias, lin.bias[rows])
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    out, inp = torch.tensor([1, 2, 5]), torch.tensor([0, 3])
    small = slice_conv(conv, out, inp)
    x = torch.randn(2, 4, 7, 7, generator=gen(0))
    torch.testing.assert_close(small(x[:, inp]), conv(x * torch.tensor([1.0, 0, 0, 1.0])[:, None, None])[:, out])


@pytest.mark.parametrize("fields, message", [({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"),
                                             ({"ratio": True}, "ratio"), ({"importance": "random"}, "random"),
                                             ({"reconstruct": "yes"}, "reconstruct"),
                                             ({"version": 3}, "version")])
def test_invalid_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        StructuredConfig(**fields)


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


# ---------------------------------------------------------------- conv channels


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def randomise_batchnorm(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)


def test_removing_unread_conv_channels_keeps_outputs_through_batchnorm_and_flatten():
    model = SmallCNN().eval()
    randomise_batchnorm(model.features[1])
    with torch.no_grad():
        model.features[3].weight[:, [1, 6]] = 0  # conv 2 never reads channels 1 and 6 of conv 1
        W = model.head.weight.view(5, 12, 16)
        W[:, [0, 4, 7, 9]] = 0  # the head never reads channels 0, 4, 7, 9 of conv 2
    x = torch.randn(4, 3, 8, 8, generator=gen(1))
    before, count = model(x), params(model)
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.25},
                                            "targets": {"include": ["features.0"]}},
                                           {"pass": "prune_channels", "config": {"ratio": 0.34},
                                            "targets": {"include": ["features.3"]}}]})
    assert model.features[0].out_channels == 6 and model.features[1].num_features == 6
    assert model.features[3].in_channels == 6 and model.features[3].out_channels == 8
    assert model.head.in_features == 8 * 16
    assert params(model) < count
    assert_same(model(x), before)


def test_digits_cnn_channels_prune_through_functional_ops():
    model = DigitsCNN().eval()
    with torch.no_grad():
        model.fc1.weight.view(64, 32, 16)[:, :8] = 0  # channels 0-7 of conv2 feed nothing
    x = torch.randn(6, 1, 8, 8, generator=gen(2))
    before = model(x)
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.25},
                                            "targets": {"include": ["conv2"]}}]})
    assert model.conv2.out_channels == 24 and model.fc1.in_features == 24 * 16
    assert_same(model(x), before)


class ViewCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(2, 6, 3, padding=1), nn.Linear(6 * 16, 3)

    def forward(self, x):
        h = F.avg_pool2d(torch.sigmoid(self.conv(x)), 2)
        return self.fc(h.view(h.size(0), -1))


def test_view_with_the_batch_size_counts_as_a_flatten():
    model = ViewCNN()
    with torch.no_grad():
        model.fc.weight.view(3, 6, 16)[:, [1, 4]] = 0
    x = torch.randn(2, 2, 8, 8, generator=gen(0))
    before = model(x)
    modelpress.compress(model, stage("prune_channels", ratio=0.34))
    assert model.conv.out_channels == 4 and model.fc.in_features == 64
    assert_same(model(x), before)


def test_channel_plan_follows_the_graph():
    import torch.fx

    model = SmallCNN()
    graph = torch.fx.symbolic_trace(model).graph
    plan = channel_plan(model, graph, "features.0")
    assert (plan.batchnorms, plan.convs, plan.linears) == (["features.1"], ["features.3"], [])
    assert channel_plan(model, graph, "features.3").linears == [("head", 16)]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8)

    def forward(self, x):
        return self.b(self.a(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.b(self.a(x))
        return x


@pytest.mark.parametrize("model, target, error, message", [
    (Residual(), "a", UnsupportedError, "mixes it with another tensor"),
    (nn.Sequential(nn.Conv2d(3, 4, 1)), "0", UnsupportedError, "output"),
    (Grouped(), "a", UnsupportedError, "grouped convolution"),
    (Grouped(), "b", ConfigError, "groups=1"),
    (Untraceable(), "a", UnsupportedError, "cannot trace"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 9 + 1, 2)), "0", UnsupportedError, "multiple"),
], ids=["residual", "model-output", "feeds-grouped", "is-grouped", "untraceable", "bad-flatten"])
def test_layers_that_cannot_be_structurally_pruned_are_refused(model, target, error, message):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message) as info:
        modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.5},
                                                "targets": {"include": [target]}}]})
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was changed


def test_conv_activation_importance_drops_silent_channels():
    model = SmallCNN().eval()
    with torch.no_grad():
        model.features[3].weight[[2, 5, 8]] = 0
        model.features[3].bias[[2, 5, 8]] = -5.0  # ReLU silences these channels
    calibration = [torch.randn(8, 3, 8, 8, generator=gen(i)) for i in range(2)]
    x = torch.randn(4, 3, 8, 8, generator=gen(3))
    before = model(x)
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.25, "importance":
                                                                                "activation"},
                                            "targets": {"include": ["features.3"]}}]}, calibration=calibration)
    assert model.features[3].out_channels == 9
    assert_same(model(x), before)


# ---------------------------------------------------------------- save and load


def test_pruned_bert_saves_and_reloads_with_its_new_shapes(tmp_path):
    model, skeleton = tiny_bert(), tiny_bert(seed=1)
    modelpress.compress(model, {"stages": [{"pass": "prune_ffn", "config": {"ratio": 0.25}},
                                           {"pass": "prune_heads", "config": {"ratio": 0.5},
                                            "targets": {"include": ["encoder.layer.1.attention"]}},
                                           {"pass": "magnitude", "config": {"pattern": "2:4"},
                                            "targets": {"include": ["encoder.layer.0.*"]}}]})
    path = modelpress.save(model, tmp_path / "bert")
    loaded = modelpress.load(path, model=skeleton)
    inputs = bert_inputs()
    assert torch.equal(run_bert(loaded, inputs), run_bert(model, inputs))
    assert loaded.encoder.layer[1].attention.self.num_attention_heads == 2
    assert loaded.encoder.layer[0].attention.self.num_attention_heads == 4
    assert params(loaded) == params(model)


def test_pruned_cnn_saves_and_reloads(tmp_path):
    model, skeleton = SmallCNN().eval(), SmallCNN().eval()
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.5}}]})
    path = modelpress.save(model, tmp_path / "cnn")
    loaded = modelpress.load(path, model=skeleton)
    x = torch.randn(2, 3, 8, 8, generator=gen(0))
    assert torch.equal(loaded(x), model(x))


def _tamper(path, name, entry):
    manifest = json.loads((path / MANIFEST).read_text())
    if entry is None:
        manifest["shapes"] = name
    else:
        manifest["shapes"][name] = entry
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, entry, message", [
    ("features.0", {"type": "conv2d", "size": [16, 3]}, "widths must lie"),
    ("features.0", {"type": "conv2d", "size": [0, 3]}, "widths must lie"),
    ("features.0", {"type": "conv2d", "size": [4]}, "widths must lie"),
    ("features.0", {"type": "conv2d", "size": [4, True]}, "widths must lie"),
    ("features.0", {"type": "linear", "size": [4, 3]}, "does not match"),
    ("nowhere", {"type": "linear", "size": [4, 3]}, "does not match"),
    ("", {"type": "linear", "size": [4, 3]}, "does not match"),
    (["not", "a", "map"], None, "must map"),
])
def test_hostile_shapes_are_refused(tmp_path, name, entry, message):
    model = SmallCNN().eval()
    path = modelpress.save(model, tmp_path / "cnn")
    _tamper(path, name, entry)
    with pytest.raises(FormatError, match=message):
        modelpress.load(path, model=SmallCNN())


def test_declared_shapes_must_agree_with_the_arrays(tmp_path):
    model = SmallCNN().eval()
    path = modelpress.save(model, tmp_path / "cnn")
    _tamper(path, "head", {"type": "linear", "size": [5, 100]})
    with pytest.raises(FormatError, match="head.weight"):
        modelpress.load(path, model=SmallCNN())


def test_record_and_apply_shapes_round_trip():
    model = modelpress.compress(tiny_bert(), stage("prune_ffn", ratio=0.5))
    skeleton = tiny_bert()
    apply_shapes(skeleton, record_shapes(model))
    assert record_shapes(skeleton) == record_shapes(model)


# ---------------------------------------------------------------- the real MiniLM


@pytest.mark.slow
def test_minilm_ffn_pruning_really_shrinks_and_reloads(minilm, tmp_path):
    from modelpress.data.corpus import corpus_splits

    model = modelpress.compress(copy.deepcopy(minilm), stage("prune_ffn", ratio=0.3))
    sentences = list(corpus_splits(n_eval=64, n_calib=1).evaluation)
    layer = model.model.encoder.layer[0]
    assert layer.intermediate.dense.weight.shape == (1075, 384) and layer.output.dense.weight.shape == (384, 1075)
    assert params(model) == params(minilm) - 6 * 461 * (384 + 1 + 384)
    emb = model.encode(sentences)
    assert F.cosine_similarity(emb, minilm.encode(sentences)).mean() > 0.7  # no fine-tuning: a real loss
    path = modelpress.save(model, tmp_path / "minilm-ffn30")
    assert torch.equal(modelpress.load(path).encode(sentences), emb)
