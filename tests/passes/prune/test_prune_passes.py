"""The magnitude, Wanda and SparseGPT passes through compress(): masks, N:M, convs, quantised kept values,
bytes, sparse kernels, save and load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress
from modelpress.nn.provenance import provenance
from modelpress.encodings import QuantizedTensor
from modelpress.encodings.sparse import SparseLayout, SparseTensor
from modelpress.errors import CalibrationError, ConfigError
from modelpress.nn import CompressedConv2d, CompressedLinear, Kernel
from modelpress.passes.prune import pruned_count, topk_mask
from _prune_support import MLP, correlated, gen, linears, reference_keep  # noqa: E402


# ---------------------------------------------------------------- magnitude pass


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_magnitude_keeps_the_largest_weights_and_runs_as_the_masked_model(scope, sparsity):
    model = MLP()
    dense = copy.deepcopy(model)
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "config": {"sparsity": sparsity, "scope": scope,
                                                                         "kernel": "dense"}}]})
    x = torch.randn(5, 32, generator=gen(3))
    masked = copy.deepcopy(dense)
    for (name, layer), ref in zip(linears(model).items(), linears(masked).values()):
        enc = layer.encoding
        assert isinstance(layer, CompressedLinear) and isinstance(enc, SparseTensor)
        W = ref.weight.detach()
        expect = topk_mask(W.abs(), sparsity, per_row=scope == "row")
        assert torch.equal(enc.mask(), expect)
        assert enc.nnz == W.numel() - (pruned_count(W.shape[1], sparsity) * W.shape[0] if scope == "row"
                                       else pruned_count(W.numel(), sparsity))
        with torch.no_grad():
            ref.weight.mul_(expect)
    assert torch.equal(model(x), masked(x))  # dense kernel on the decoded weight: the same float ops


def test_global_magnitude_shares_one_threshold_across_layers():
    model = MLP()
    weights = [m.weight.detach().clone() for m in linears(model).values()]
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "config": {"sparsity": 0.7, "scope": "global"}}]})
    encs = [m.encoding for m in linears(model).values()]
    total = sum(w.numel() for w in weights)
    assert sum(e.nnz for e in encs) == total - pruned_count(total, 0.7)
    kept = torch.cat([w.abs()[e.mask()] for w, e in zip(weights, encs)])
    pruned = torch.cat([w.abs()[~e.mask()] for w, e in zip(weights, encs)])
    assert kept.min() >= pruned.max()
    assert len({round(e.density, 3) for e in encs}) > 1  # layers end up with different densities


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_magnitude_nm_patterns_are_exact(pattern):
    n, m = map(int, pattern.split(":"))
    model = MLP()
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "config": {"pattern": pattern}}]})
    for layer in linears(model).values():
        enc = layer.encoding
        mask = enc.matrix_mask()
        assert enc.layout is SparseLayout.NM and enc.nm == (n, m)
        assert (mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all()


def test_nm_on_a_width_it_does_not_divide_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 10), nn.Linear(10, 3))
    with pytest.raises(ConfigError, match=r"layer '2'.*divisible by 4, got 10"):
        modelpress.compress(model, {"stages": [{"pass": "magnitude", "config": {"pattern": "2:4"}}]})
    assert all(type(m) is nn.Linear for m in model)  # refused before anything was rewritten


def test_conv_layers_are_pruned_too():
    conv = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))  # rows of 36 and 8 inputs
    x = torch.randn(2, 4, 6, 6, generator=gen(0))
    ref = copy.deepcopy(conv)
    modelpress.compress(conv, {"stages": [{"pass": "magnitude", "config": {"pattern": "2:4"}}]})
    assert isinstance(conv[0], CompressedConv2d) and conv[0].encoding.shape == (8, 4, 3, 3)
    with torch.no_grad():
        for layer, r in ((conv[0], ref[0]), (conv[2], ref[2])):
            r.weight.mul_(layer.encoding.mask())
    torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("group_size", ["channel", 8])
def test_magnitude_with_quantised_kept_values(group_size):
    model = MLP()
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "config": {
        "sparsity": 0.5, "scope": "row", "bits": 4, "group_size": group_size}}]})
    enc = model.layers[0].encoding
    assert isinstance(enc.values, QuantizedTensor) and enc.values.shape == (64, 16)
    assert enc.nbytes < 0.16 * 64 * 32 * 4


def test_quantised_groups_must_divide_the_kept_values():
    with pytest.raises(ConfigError, match=r"layer 'layers.0'.*kept values"):
        modelpress.compress(MLP(), {"stages": [{"pass": "magnitude", "config": {
            "sparsity": 0.5, "scope": "row", "bits": 4, "group_size": 32}}]})


def test_bytes_fall_with_sparsity_and_half_is_under_60_percent():
    sizes = []
    for sparsity in (0.0, 0.5, 0.7, 0.9, 0.97):
        model = modelpress.compress(MLP((384, 1536, 384)), {"stages": [{"pass": "magnitude",
                                                                       "config": {"sparsity": sparsity}}]})
        sizes.append(sum(m.encoding.nbytes for m in linears(model).values()) / (2 * 384 * 1536 * 4))
    assert sizes == sorted(sizes, reverse=True) and sizes[1] <= 0.60, sizes


# ---------------------------------------------------------------- wanda (real calibration inputs)


def test_wanda_mask_follows_weight_times_activation_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    scale = torch.ones(16)
    scale[:3] = 20.0  # three loud input channels
    batches = [torch.randn(8, 16, generator=gen(i)) * scale for i in range(4)]
    W = model[0].weight.detach().clone()
    X = torch.cat(batches)
    modelpress.compress(model, {"stages": [{"pass": "wanda", "config": {"sparsity": 0.5}}]}, calibration=batches)
    expect = torch.stack([reference_keep(r, 8) for r in W.abs() * X.double().norm(dim=0).float()])
    assert torch.equal(model[0].encoding.mask(), expect)
    loud_kept = expect[:, :3].float().mean()
    assert loud_kept >= 0.9 and loud_kept > topk_mask(W.abs(), 0.5, True)[:, :3].float().mean()


def test_wanda_without_calibration_says_how_to_give_it():
    with pytest.raises(CalibrationError, match="needs calibration data"):
        modelpress.compress(MLP(), {"stages": [{"pass": "wanda", "config": {"pattern": "2:4"}}]})


# ---------------------------------------------------------------- sparsegpt / wanda passes


def test_sparsegpt_pass_writes_sparse_quantised_layers():
    model, baseline = MLP(), MLP()
    batches = [correlated(16, 32, seed=i).float() for i in range(8)]
    x = correlated(256, 32, seed=99).float()
    ref = model(x).detach()
    config = {"pattern": "2:4", "bits": 4, "group_size": 8}
    modelpress.compress(model, {"stages": [{"pass": "sparsegpt", "config": {**config, "block_size": 16}}]},
                        calibration=batches)
    modelpress.compress(baseline, {"stages": [{"pass": "magnitude", "config": config}]})
    for layer in linears(model).values():
        assert isinstance(layer.encoding, SparseTensor) and isinstance(layer.encoding.values, QuantizedTensor)
        assert layer.encoding.layout is SparseLayout.NM
    ours, theirs = F.cosine_similarity(model(x), ref).mean(), F.cosine_similarity(baseline(x), ref).mean()
    assert ours > theirs + 0.05, (ours, theirs)
    assert any("sparsegpt 2:4, kept values int4" in line for line in provenance(model).log)


def test_sparsegpt_pass_refuses_groups_before_calibrating():
    with pytest.raises(ConfigError, match=r"layer 'layers.0'"):
        modelpress.compress(MLP(), {"stages": [{"pass": "sparsegpt", "config": {
            "sparsity": 0.5, "bits": 4, "group_size": 48}}]}, calibration=None)


# ---------------------------------------------------------------- kernels, save and load


def test_pruned_model_saves_small_and_reloads_identically(tmp_path):
    from safetensors.torch import load_file

    model = MLP((64, 256, 64))
    skeleton = copy.deepcopy(model)
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "config": {"sparsity": 0.9}}]})
    path = modelpress.save(model, tmp_path / "pruned")
    loaded = modelpress.load(path, model=skeleton)
    x = torch.randn(3, 64, generator=gen(0))
    assert torch.equal(loaded(x), model(x))
    arrays = load_file(str(path / "weights.safetensors"))
    weight_bytes = sum(v.numel() * v.element_size() for k, v in arrays.items() if "::" in k)
    assert weight_bytes < 0.15 * 2 * 64 * 256 * 4


@pytest.mark.parametrize("kernel", ["sparse_csr", "dense", "decode", "auto"])
def test_every_sparse_kernel_gives_the_masked_product(kernel):
    model = MLP()
    ref = copy.deepcopy(model)
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "config": {"sparsity": 0.8, "kernel": kernel}}]})
    with torch.no_grad():
        for layer, r in zip(linears(model).values(), linears(ref).values()):
            r.weight.mul_(layer.encoding.mask())
    x = torch.randn(4, 3, 32, generator=gen(0))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    if kernel != "auto":
        assert model.layers[0].resolved_kernel is Kernel(kernel)
