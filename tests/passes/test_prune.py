"""Unstructured and N:M pruning: masks against plain references, the passes through compress(),
Wanda's scores from real activations, SparseGPT against a plain OBS loop and against GPTQ at
sparsity 0, prune + quantise in one pass, gradual pruning, configs, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress
from modelpress.encodings import QuantizedTensor, QuantScheme, mse_params, quantize
from modelpress.encodings.sparse import SparseLayout, SparseTensor
from modelpress.errors import CalibrationError, ConfigError, RecipeError
from modelpress.nn import CompressedConv2d, CompressedLinear, Kernel
from modelpress.passes import GradualConfig, GradualPruner, MagnitudeConfig, SparseGPTConfig, WandaConfig
from modelpress.passes.gptq import gptq_quantize, output_error
from modelpress.passes.prune import (
    cubic_sparsity,
    global_masks,
    nm_mask,
    pruned_count,
    sparsegpt_prune,
    topk_mask,
    wanda_scores,
)
from modelpress.passes.quantize import RangeSearch

# ---------------------------------------------------------------- helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int = 512, c: int = 64, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(n, c) inputs with correlated channels of very different scales."""
    mix = torch.randn(16, c, generator=gen(seed)) * torch.linspace(0.1, 3.0, c)
    return (torch.randn(n, 16, generator=gen(seed + 1)) @ mix + 0.1 * torch.randn(n, c, generator=gen(seed + 2))).to(dtype)


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / len(X)


def reference_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the `keep` largest entries of a 1-D tensor, ties to the lower index, by a Python sort."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:keep]
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order] = True
    return mask


class MLP(nn.Module):
    def __init__(self, dims=(32, 64, 48, 8), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))}


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("total, sparsity, expect", [(10, 0.5, 5), (10, 0.25, 3), (10, 0.24, 2), (3, 0.5, 2),
                                                     (7, 0.0, 0), (4, 0.999, 4)])
def test_pruned_count_rounds_to_nearest(total, sparsity, expect):
    assert pruned_count(total, sparsity) == expect


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_topk_mask_matches_a_plain_sort(per_row, sparsity):
    scores = torch.randint(0, 6, (7, 12), generator=gen(1)).float()  # many ties
    mask = topk_mask(scores, sparsity, per_row)
    if per_row:
        expect = torch.stack([reference_keep(r, 12 - pruned_count(12, sparsity)) for r in scores])
    else:
        expect = reference_keep(scores.reshape(-1), 84 - pruned_count(84, sparsity)).reshape(7, 12)
    assert torch.equal(mask, expect)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_matches_a_plain_loop(n, m):
    scores = torch.randint(0, 5, (5, 4 * m), generator=gen(2)).float()
    mask = nm_mask(scores, n, m)
    for r in range(5):
        for g in range(4):
            assert torch.equal(mask[r, g * m:(g + 1) * m], reference_keep(scores[r, g * m:(g + 1) * m], n))
    assert (mask.reshape(5, 4, m).sum(-1) == n).all()


def test_nm_mask_refuses_a_width_it_does_not_divide():
    with pytest.raises(ConfigError, match="divisible by 4"):
        nm_mask(torch.rand(3, 10), 2, 4)


def test_global_masks_use_one_threshold():
    a, b = torch.rand(4, 8, generator=gen(0)), 3 * torch.rand(6, 5, generator=gen(1))
    ma, mb = global_masks([a, b], 0.6)
    flat = torch.cat([a.reshape(-1), b.reshape(-1)])
    assert torch.equal(torch.cat([ma.reshape(-1), mb.reshape(-1)]), reference_keep(flat, 62 - pruned_count(62, 0.6)))
    assert mb.float().mean() > ma.float().mean()  # the larger tensor keeps more


def test_wanda_scores_are_weight_times_input_norm():
    W = torch.randn(3, 4, generator=gen(0))
    X = torch.randn(50, 4, generator=gen(1)) * torch.tensor([1.0, 10.0, 0.1, 0.0])
    expect = torch.tensor([[abs(W[i, j].item()) * X[:, j].norm().item() for j in range(4)] for i in range(3)])
    torch.testing.assert_close(wanda_scores(W, (X * X).sum(0)), expect)


# ---------------------------------------------------------------- configs


BAD_CONFIGS = [
    (MagnitudeConfig, {"sparsity": -0.1}, "sparsity"),
    (MagnitudeConfig, {"sparsity": 1.0}, "sparsity"),
    (MagnitudeConfig, {"sparsity": 1.5}, "sparsity"),
    (MagnitudeConfig, {"sparsity": True}, "sparsity"),
    (MagnitudeConfig, {"sparsity": "0.5"}, "sparsity"),
    (MagnitudeConfig, {}, "needs a sparsity"),
    (MagnitudeConfig, {"pattern": "4:2"}, "N:M"),
    (MagnitudeConfig, {"pattern": "2:2"}, "N:M"),
    (MagnitudeConfig, {"pattern": "2-4"}, "pattern"),
    (MagnitudeConfig, {"pattern": "2:4", "sparsity": 0.6}, "contradicts"),
    (MagnitudeConfig, {"pattern": "2:4", "scope": "global"}, "no global scope"),
    (MagnitudeConfig, {"sparsity": 0.5, "scope": "everywhere"}, "everywhere"),
    (MagnitudeConfig, {"sparsity": 0.5, "bits": 4}, "same count kept in every row"),
    (MagnitudeConfig, {"sparsity": 0.5, "bits": 5, "scope": "row"}, "bit width"),
    (MagnitudeConfig, {"sparsity": 0.5, "bits": 4, "scope": "row", "group_size": "tensor"}, "per row or in groups"),
    (MagnitudeConfig, {"sparsity": 0.5, "kernel": "int8_mm"}, "cannot run a sparse weight"),
    (MagnitudeConfig, {"sparsity": 0.5, "version": 2}, "version"),
    (SparseGPTConfig, {"sparsity": 0.5, "damp": 2.0}, "damp"),
    (SparseGPTConfig, {"sparsity": 0.5, "block_size": 0}, "block_size"),
    (SparseGPTConfig, {"pattern": "4:8", "block_size": 12}, "multiple of M"),
    (WandaConfig, {"sparsity": 0.5, "search": "best"}, "best"),
]


@pytest.mark.parametrize("cls, fields, message", BAD_CONFIGS)
def test_invalid_configs_give_one_line_errors(cls, fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        cls(**fields)
    assert "\n" not in str(info.value)


def test_recipe_errors_name_the_stage():
    with pytest.raises(RecipeError, match=r"stage 0 \(magnitude\).*sparsity"):
        modelpress.Recipe.from_yaml("stages: [{pass: magnitude, config: {sparsity: 1.2}}]")


def test_configs_round_trip_through_yaml():
    recipe = modelpress.Recipe.from_yaml(
        "stages: [{pass: sparsegpt, config: {pattern: '2:4', bits: 4, group_size: 32}, targets: {types: [Linear]}}]")
    again = modelpress.Recipe.from_yaml(recipe.to_yaml())
    assert again.stages[0].config == recipe.stages[0].config
    assert recipe.stages[0].config.nm == (2, 4) and recipe.stages[0].config.target_sparsity == 0.5


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


# ---------------------------------------------------------------- sparsegpt (pure)


def reference_sparsegpt(W, H, sparsity, nm, damp):
    """The plain OBS loop: one column at a time with the explicit inverse Hessian of the columns not yet
    processed; unstructured masks chosen per row at the start (one block), N:M masks group by group."""
    W, H = W.clone(), H.clone()
    R, C = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(C, dtype=H.dtype))
    diag, tmp = torch.zeros(C, dtype=H.dtype), Hinv.clone()  # the diagonal as the loop will see it
    for j in range(C):
        diag[j] = tmp[j, j]
        tmp = tmp - torch.outer(tmp[:, j], tmp[j, :]) / tmp[j, j]
    mask = torch.zeros(R, C, dtype=torch.bool)
    if nm is None:
        for r in range(R):
            mask[r] = reference_keep(W[r] ** 2 / diag, C - pruned_count(C, sparsity))
    for j in range(C):
        if nm is not None and j % nm[1] == 0:
            for r in range(R):
                mask[r, j:j + nm[1]] = reference_keep(W[r, j:j + nm[1]] ** 2 / diag[j:j + nm[1]], nm[0])
        q = torch.where(mask[:, j], W[:, j], 0.0)
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        W[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W, mask


@pytest.mark.parametrize("sparsity, nm, block", [(0.5, None, 64), (0.3, None, 64), (0.5, (2, 4), 16),
                                                 (0.5, (4, 8), 64), (0.75, (1, 4), 8)])
def test_sparsegpt_equals_the_plain_obs_loop(sparsity, nm, block):
    X = correlated(c=64)
    W = torch.randn(10, 64, generator=gen(5), dtype=torch.float64)
    H = hessian(X)
    H[:, 7] = H[7, :] = 0  # a dead input
    got = sparsegpt_prune(W, H, sparsity, nm, damp=0.01, block_size=block)
    want, mask = reference_sparsegpt(W, H, sparsity, nm, 0.01)
    assert torch.equal(got.mask, mask)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-9)
    assert (got.weight[~got.mask] == 0).all()


@pytest.mark.parametrize("scheme", [QuantScheme(4, False, "channel"), QuantScheme(3, True, "channel"),
                                    QuantScheme(8, True, "channel")])
@pytest.mark.parametrize("search", [RangeSearch.MSE, RangeSearch.MINMAX])
def test_sparsegpt_at_sparsity_zero_is_gptq(scheme, search):
    X, W = correlated(c=64).float(), torch.randn(12, 64, generator=gen(6))
    H = hessian(X.double())
    got = sparsegpt_prune(W, H, 0.0, None, scheme, search, block_size=32)
    want = gptq_quantize(W, H, scheme, search, block_size=32)  # per row, ranges from the whole row: the same
    assert got.mask.all() and torch.equal(got.weight, want.weight)


def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs():
    X, W = correlated(c=64), torch.randn(16, 64, generator=gen(7), dtype=torch.float64)
    H = hessian(X)
    for sparsity, nm in ((0.5, None), (0.5, (2, 4))):
        pick = (lambda s: nm_mask(s, *nm)) if nm else (lambda s: topk_mask(s, sparsity, True))
        magnitude_err = output_error(W, W * pick(W.abs()), H)
        wanda_err = output_error(W, W * pick(wanda_scores(W, H.diagonal())), H)
        sparsegpt_err = output_error(W, sparsegpt_prune(W, H, sparsity, nm).weight, H)
        assert sparsegpt_err < 0.7 * wanda_err < 0.7 * magnitude_err, (sparsegpt_err, wanda_err, magnitude_err)


@pytest.mark.parametrize("nm, group_size", [(None, "channel"), (None, 16), ((2, 4), 32), ((4, 8), 16)])
def test_sparsegpt_prune_and_quantise_in_one_pass(nm, group_size):
    X, W = correlated(c=128).float(), torch.randn(16, 128, generator=gen(8))
    H = hessian(X.double())
    scheme = QuantScheme(4, False, group_size)
    result = sparsegpt_prune(W, H, 0.5, nm, scheme, block_size=64)
    enc = result.encoding(nm, scheme)
    assert isinstance(enc.values, QuantizedTensor) and enc.values.shape == (16, 64)
    assert torch.equal(enc.decode(), result.weight)  # what is stored is exactly what was optimised
    assert (result.mask.sum(1) == 64).all()
    plain = sparsegpt_prune(W, H, 0.5, nm, block_size=64)  # prune, then quantise the kept values by RTN
    kept = plain.weight[plain.mask].reshape(16, 64)
    two_step = torch.zeros_like(W).masked_scatter(plain.mask, quantize(kept, scheme, *mse_params(kept, scheme)).decode())
    assert torch.equal(result.mask, plain.mask)  # the first sweep fixes the mask
    assert output_error(W, result.weight, H) <= 1.01 * output_error(W, two_step, H)  # never worse, mostly better


def test_sparsegpt_groups_must_divide_the_kept_values():
    with pytest.raises(ConfigError, match="does not divide the 32 kept values"):
        sparsegpt_prune(torch.randn(4, 64), torch.eye(64), 0.5, None, QuantScheme(4, False, 64), block_size=16)
    result = sparsegpt_prune(torch.randn(4, 64), torch.eye(64), 0.5, None, QuantScheme(4, False, 32), block_size=16)
    assert result.scale.shape == (4, 1, 1)  # a group may span blocks


def test_sparsegpt_at_sparsity_zero_without_quantisation_changes_nothing():
    W = torch.randn(6, 32, generator=gen(9))
    assert torch.equal(sparsegpt_prune(W, hessian(correlated(c=32)), 0.0).weight, W)


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
    assert any("sparsegpt 2:4, kept values int4" in line for line in model.modelpress_log)


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


# ---------------------------------------------------------------- gradual pruning


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.9, 0.0, 10, 110) == 0.0
    assert cubic_sparsity(10, 0.9, 0.0, 10, 110) == 0.0
    assert cubic_sparsity(60, 0.9, 0.0, 10, 110) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert cubic_sparsity(110, 0.9, 0.0, 10, 110) == 0.9 == cubic_sparsity(500, 0.9, 0.0, 10, 110)
    values = [cubic_sparsity(t, 0.8, 0.1, 0, 50) for t in range(60)]
    assert values == sorted(values)


@pytest.mark.parametrize("fields, message", [
    ({"final_sparsity": 1.0}, "final_sparsity"),
    ({"initial_sparsity": 0.5, "final_sparsity": 0.3}, "exceeds"),
    ({"start_step": 10, "end_step": 10}, "after start_step"),
    ({"every": 0}, "every"),
    ({"importance": "random"}, "random"),
    ({"taylor_decay": 1.0}, "taylor_decay"),
])
def test_invalid_gradual_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        GradualConfig(**fields)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "movement"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradual_pruner_reaches_its_sparsity_with_monotone_masks(importance, scope):
    model = MLP()
    config = GradualConfig(final_sparsity=0.8, end_step=20, every=4, importance=importance, scope=scope)
    pruner = GradualPruner(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    for step in range(24):
        x = torch.randn(16, 32, generator=gen(step))
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        pruner.observe()
        optimizer.step()
        pruner.step(step)
        for n, m in pruner.masks.items():
            assert not (m & ~previous[n]).any()  # nothing pruned comes back
            assert (pruner.layers[n].weight[~m] == 0).all()
            previous[n] = m.clone()
    total = sum(m.numel() for m in pruner.masks.values())
    kept = sum(int(m.sum()) for m in pruner.masks.values())
    if scope == "global":
        assert kept == total - pruned_count(total, 0.8)
    else:
        assert all(int(m.sum()) == m.numel() - pruned_count(m.numel(), 0.8) for m in pruner.masks.values())
    x = torch.randn(4, 32, generator=gen(0))
    before = model(x)
    pruner.finalize()
    assert all(isinstance(m.encoding, SparseTensor) for m in linears(model).values())
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_gradual_pruner_refuses_unknown_layers():
    with pytest.raises(ConfigError, match="only Linear and Conv2d"):
        GradualPruner(MLP(), GradualConfig(), names=["layers.9"])


# ---------------------------------------------------------------- digits: 90% sparsity by gradual fine-tuning


def finetune_with_pruning(model, data, config: GradualConfig, epochs: int, seed: int, lr: float = 1e-3,
                          batch_size: int = 64) -> GradualPruner:
    """Adam on the digits training split, masks tightening on the pruner's schedule."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    pruner = GradualPruner(model, config)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            pruner.observe()
            optimizer.step()
            pruner.step(step)
            step += 1
    model.eval()
    return pruner


@pytest.fixture
def one_thread():
    """Small convolutions run fastest on one thread (and the result must not depend on the count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    from modelpress.models import DigitsCNN, load_digits_data, train

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_digits_data()
        model = DigitsCNN()
        train(model, data, epochs=30)
    finally:
        torch.set_num_threads(previous)
    return model, data


@pytest.mark.slow
def test_digits_cnn_at_90_percent_sparsity_loses_at_most_half_a_point(digits, one_thread, tmp_path):
    from modelpress.models import accuracy

    model, data = digits
    base = accuracy(model, data)
    steps_per_epoch = -(-len(data.y_train) // 64)
    config = GradualConfig(final_sparsity=0.9, end_step=15 * steps_per_epoch, every=steps_per_epoch // 2,
                           importance="taylor")
    drops = []
    for seed in range(3):
        pruned = copy.deepcopy(model)
        pruner = finetune_with_pruning(pruned, data, config, epochs=30, seed=seed)
        pruner.finalize()
        total = sum(m.encoding.numel for m in pruned.modules() if hasattr(m, "encoding"))
        kept = sum(m.encoding.nnz for m in pruned.modules() if hasattr(m, "encoding"))
        assert kept == total - pruned_count(total, 0.9)
        drops.append(100 * (base - accuracy(pruned, data)))
    assert sorted(drops)[1] <= 0.5, drops  # the median of three fine-tuning runs (one image = 0.28 points)
    path = modelpress.save(pruned, tmp_path / "digits")
    loaded = modelpress.load(path, model=copy.deepcopy(model))
    assert accuracy(loaded, data) == accuracy(pruned, data)
    assert (path / "weights.safetensors").stat().st_size < 0.25 * 4 * total


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
def test_magnitude_stores_positions_in_the_layout_asked_for(layout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    dense = model[0].weight.detach().clone()
    modelpress.compress(model, {"stages": [{"pass": "magnitude", "targets": {"types": ["Linear"]},
                                            "config": {"sparsity": 0.9, "layout": layout}}]})
    enc = model[0].encoding
    assert isinstance(enc, SparseTensor) and enc.layout is SparseLayout(layout)
    assert torch.equal(enc.decode(), dense * enc.mask())


def test_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="layout 'zip' is not valid"):
        MagnitudeConfig(sparsity=0.5, layout="zip")
