"""Low-rank pass: Eckart-Young against numpy's SVD, the activation-aware optimum against a QR-based
reference, rank rules against direct computations, quantised factors, skipped layers, the recipe
and checkpoint paths, and clear errors for bad configs and missing calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.nn.provenance import provenance
from modelpress.compress import compress
from modelpress.encodings import DenseTensor, LowRankTensor, QuantizedTensor, QuantScheme
from modelpress.errors import CalibrationError, ConfigError, RecipeError
from modelpress.formats.checkpoint import load, save
from modelpress.nn import CompressedConv2d, CompressedLinear, Kernel
from modelpress.passes.base import PassContext, Target
from modelpress.passes.lowrank import (
    LowRankConfig,
    choose_rank,
    energy_rank,
    factorise,
    lowrank,
    spectrum,
    whiten,
)
from modelpress.encodings import RangeSearch, quantize_weight


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight(rows: int, cols: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=gen(seed), dtype=dtype)


def low_rank_ish(rows: int, cols: int, rank: int, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    """A weight with a decaying spectrum: rank-`rank` signal plus small noise (float32)."""
    signal = torch.randn(rows, rank, generator=gen(seed)) @ torch.randn(rank, cols, generator=gen(seed + 1))
    return (signal / math.sqrt(rank) + noise * torch.randn(rows, cols, generator=gen(seed + 2))) * 0.2


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """(n, cols) float64 inputs with strongly correlated channels of very different scales."""
    mixing = torch.randn(cols, cols, generator=gen(seed), dtype=torch.float64)
    scales = torch.logspace(0, -2, cols, dtype=torch.float64)
    return torch.randn(n, cols, generator=gen(seed + 1), dtype=torch.float64) @ (mixing * scales[:, None])


def output_error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(X @ (W - W_hat).T))


def qr_optimum(W: np.ndarray, X: np.ndarray, rank: int) -> np.ndarray:
    """argmin over rank-r W' of ||X W^T - X W'^T||_F, straightforwardly: with X = Q R (QR),
    ||X D^T|| = ||D R^T||, so W' R^T is the truncated SVD of W R^T (Eckart-Young)."""
    _, R = np.linalg.qr(X)  # (C, C) upper
    U, s, Vt = np.linalg.svd(W @ R.T, full_matrices=False)
    M = (U[:, :rank] * s[:rank]) @ Vt[:rank]
    return np.linalg.solve(R, M.T).T  # M R^-T


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize(("rows", "cols"), [(20, 30), (30, 20), (25, 25)])
@pytest.mark.parametrize("rank", [1, 5, 19])
def test_plain_truncation_error_is_eckart_young(rows, cols, rank):
    W = weight(rows, cols, seed=rows)
    left, right = factorise(W, rank)
    assert left.shape == (rows, rank) and right.shape == (rank, cols) and left.dtype == torch.float64
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    expected = math.sqrt(float((s[rank:] ** 2).sum()))
    assert float(torch.linalg.matrix_norm(W - left @ right)) == pytest.approx(expected, rel=1e-10)


def test_plain_factors_are_balanced():
    W = weight(20, 30)
    left, right = factorise(W, 6)
    s = torch.linalg.svdvals(W)[:6]
    torch.testing.assert_close(left.T @ left, torch.diag(s), atol=1e-10, rtol=0)  # U^T U = I, scaled by sqrt(S) twice
    torch.testing.assert_close(right @ right.T, torch.diag(s), atol=1e-10, rtol=0)


def test_factorise_keeps_float32_and_full_rank_is_exact():
    W = weight(12, 9, dtype=torch.float32)
    left, right = factorise(W, 9)
    assert left.dtype == right.dtype == torch.float32
    torch.testing.assert_close(left @ right, W, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"use 1 <= rank <= 9"):
        factorise(W, 10)
    with pytest.raises(ConfigError, match=r"use 1 <= rank <= 9"):
        factorise(W, 0)


@pytest.mark.parametrize(("rows", "cols", "rank"), [(24, 16, 4), (16, 24, 4), (20, 20, 10), (30, 12, 1)])
def test_activation_aware_is_the_output_error_optimum(rows, cols, rank):
    W = weight(rows, cols, seed=rank)
    X = correlated_inputs(200, cols, seed=rows)
    H = X.T @ X
    left, right = factorise(W, rank, H)
    W_aware = left @ right
    plain_left, plain_right = factorise(W, rank)
    W_plain = plain_left @ plain_right
    W_opt = torch.from_numpy(qr_optimum(W.numpy(), X.numpy(), rank))
    aware, plain, optimum = (output_error(X, W, w) for w in (W_aware, W_plain, W_opt))
    assert aware <= plain * (1 + 1e-12)
    assert aware < 0.9 * plain  # on correlated inputs whitening matters, not just ties
    assert aware == pytest.approx(optimum, rel=1e-8)
    torch.testing.assert_close(W_aware, W_opt, atol=1e-7 * float(W.abs().max()), rtol=0)
    s = np.linalg.svd(W.numpy() @ np.linalg.cholesky(H.numpy()), compute_uv=False)
    assert aware == pytest.approx(math.sqrt(float((s[rank:] ** 2).sum())), rel=1e-8)  # dropped whitened spectrum


def test_activation_aware_factors_are_balanced_in_the_whitened_metric():
    W, X = weight(16, 12), correlated_inputs(100, 12)
    H = X.T @ X
    left, right = factorise(W, 5, H)
    L, _ = whiten(H, 0.0)
    s = torch.linalg.svdvals(W @ L)[:5]
    torch.testing.assert_close(left.T @ left, torch.diag(s), atol=1e-8, rtol=0)
    torch.testing.assert_close((right @ L) @ (right @ L).T, torch.diag(s), atol=1e-8, rtol=0)


def test_singular_hessian_raises_damping_and_stays_finite():
    X = correlated_inputs(50, 10)
    X[:, 3] = 0  # a dead input channel: H is singular
    H = X.T @ X
    L, damp = whiten(H, 0.0)
    assert damp > 0 and torch.isfinite(L).all()
    left, right = factorise(weight(8, 10), 3, H)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    with pytest.raises(CalibrationError, match="stays singular"):
        whiten(torch.full((4, 4), float("nan")), 0.01)


def direct_energy_rank(s: np.ndarray, energy: float) -> int:
    total = float((s ** 2).sum())
    for k in range(1, len(s) + 1):
        if float((s[:k] ** 2).sum()) / total >= energy:
            return k
    return len(s)


@pytest.mark.parametrize("energy", [0.05, 0.5, 0.9, 0.99, 0.999999, 1.0])
def test_energy_rank_is_the_smallest_rank_reaching_the_fraction(energy):
    s = np.linalg.svd(low_rank_ish(40, 30, 6).double().numpy(), compute_uv=False)
    assert energy_rank(torch.from_numpy(s), energy) == direct_energy_rank(s, energy)
    assert energy_rank(torch.zeros(5), energy) == 1


@pytest.mark.parametrize(("rows", "cols"), [(384, 384), (1536, 384), (384, 1536), (10, 3), (3, 3)])
@pytest.mark.parametrize("budget", [0.01, 0.3, 0.6, 0.75, 0.9, 1.0])
def test_budget_rank_keeps_that_fraction_of_the_parameters(rows, cols, budget):
    rank = choose_rank(torch.ones(min(rows, cols)), rows, cols, LowRankConfig(budget=budget))
    assert rank == max(1, math.floor(budget * rows * cols / (rows + cols)))
    assert rank == 1 or rank * (rows + cols) <= budget * rows * cols


def test_fixed_rank_is_capped_at_the_weight_rank():
    assert choose_rank(torch.ones(3), 10, 3, LowRankConfig(rank=8)) == 3
    assert choose_rank(torch.ones(3), 10, 3, LowRankConfig(rank=2)) == 2


# ---------------------------------------------------------------- the pass


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    with torch.no_grad():
        model[0].weight.copy_(low_rank_ish(48, 32, 4, seed))
        model[2].weight.copy_(low_rank_ish(16, 48, 3, seed + 10))
    return model.eval()


def run(model: nn.Module, names: list[str], calibration=None, **config) -> list[str]:
    context = PassContext(calibration=calibration)
    cfg = LowRankConfig(**config)
    lowrank(model, [Target(n, model.get_submodule(n), cfg) for n in names], context)
    return context.log


def test_plain_pass_replaces_layers_with_the_truncated_svd():
    model = mlp()
    W = model[0].weight.detach().clone()
    log = run(model, ["0", "2"], rank=3)
    layer = model[0]
    assert isinstance(layer, CompressedLinear) and isinstance(layer.encoding, LowRankTensor)
    assert layer.encoding.rank == 3 and isinstance(layer.encoding.left, DenseTensor)
    left, right = factorise(W, 3)
    assert torch.equal(layer.encoding.left.values, left) and torch.equal(layer.encoding.right.values, right)
    assert layer.prepare() is Kernel.LOW_RANK  # 3 (48 + 32) < 48 * 32
    assert len(log) == 2 and log[0].startswith("0: lowrank rank 3 of 32 (svd; left fp32, right fp32)")


def test_energy_rule_in_the_pass_matches_a_direct_computation():
    model = mlp()
    s = np.linalg.svd(model[0].weight.detach().double().numpy(), compute_uv=False)
    run(model, ["0"], energy=0.95)
    assert model[0].encoding.rank == direct_energy_rank(s, 0.95)


def test_conv_layers_are_factorised_on_their_matrix_view():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1)
    model = nn.Sequential(conv)
    W = conv.weight.detach().clone()
    x = torch.randn(2, 6, 9, 9)
    run(model, ["0"], rank=4)
    new = model[0]
    assert isinstance(new, CompressedConv2d) and new.encoding.shape == (12, 6, 3, 3) and new.runs_factors
    left, right = factorise(W.reshape(12, -1), 4)
    torch.testing.assert_close(new.encoding.decode(), (left @ right).reshape(W.shape), atol=1e-6, rtol=0)
    reference = nn.functional.conv2d(x, (left @ right).reshape(W.shape), conv.bias, 2, 1)
    torch.testing.assert_close(new(x), reference, atol=1e-5, rtol=0)


def test_activation_aware_pass_uses_the_calibration_hessian():
    model = mlp()
    W = model[0].weight.detach().clone()
    batches = [torch.randn(16, 32, generator=gen(i)) @ torch.randn(32, 32, generator=gen(99)) for i in range(4)]
    log = run(model, ["0", "2"], calibration=batches, rank=3, activation_aware=True)
    X = torch.cat(batches)
    H = X.T @ X
    left, right = factorise(W.double(), 3, H.double(), damp=0.01)
    enc = model[0].encoding
    torch.testing.assert_close(enc.left.values.double() @ enc.right.values.double(), left @ right,
                               atol=1e-4 * float(W.abs().max()), rtol=0)
    assert isinstance(model[2], CompressedLinear)
    assert "activation-aware, 64 tokens;" in log[0] and "relative output error" in log[0]


def test_activation_aware_energy_is_measured_on_the_whitened_spectrum():
    model = mlp()
    W = model[0].weight.detach().double()
    batches = [correlated_inputs(64, 32, seed=i).float() for i in range(2)]
    run(model, ["0"], calibration=batches, energy=0.9, activation_aware=True, damp=0.0)
    X = torch.cat(batches).double()
    _, R = np.linalg.qr(X.numpy())
    whitened = np.linalg.svd(W.numpy() @ R.T, compute_uv=False)
    plain = np.linalg.svd(W.numpy(), compute_uv=False)
    assert direct_energy_rank(whitened, 0.9) != direct_energy_rank(plain, 0.9)  # the test can tell them apart
    assert model[0].encoding.rank == direct_energy_rank(whitened, 0.9)


def test_activation_aware_without_calibration_says_how_to_give_it():
    model = mlp()
    with pytest.raises(CalibrationError, match=r"calibration=calibration_sentences\(128\).*--calibration 128"):
        run(model, ["0"], rank=2, activation_aware=True)
    assert isinstance(model[0], nn.Linear)  # nothing was changed


def test_activation_aware_conv_is_refused_before_any_work():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="layer '0': activation-aware low-rank needs a Linear layer"):
        run(model, ["0", "2"], calibration=[torch.randn(2, 3, 3, 3)], rank=2, activation_aware=True)
    assert isinstance(model[2], nn.Linear)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_factors_are_rtn_of_the_truncated_factors(bits):
    model = mlp()
    W = model[0].weight.detach().clone()
    log = run(model, ["0"], rank=8, bits=bits, group_size=8)
    enc = model[0].encoding
    assert isinstance(enc.left, QuantizedTensor) and isinstance(enc.right, QuantizedTensor)
    assert not enc.left.scheme.symmetric and enc.right.scheme == QuantScheme(bits, False, 8)
    left, right = factorise(W, 8)
    for got, factor in ((enc.left, left), (enc.right, right)):
        want = quantize_weight(factor, QuantScheme(bits, False, 8), RangeSearch.MSE)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    fp = left @ right
    error = float((enc.decode() - fp).norm() / fp.norm())
    assert error < (0.01 if bits == 8 else 0.15)
    assert f"left int{bits} asym g8, right int{bits} asym g8" in log[0]


def test_left_factor_falls_back_to_per_channel_when_the_group_does_not_divide_the_rank():
    model = mlp()
    log = run(model, ["0"], rank=5, bits=4, group_size=8)
    enc = model[0].encoding
    assert enc.left.scheme == QuantScheme(4, False, "channel") and enc.right.scheme == QuantScheme(4, False, 8)
    assert "left int4 asym per-channel, right int4 asym g8" in log[0]


def test_non_finite_weight_is_refused_before_any_work():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="layer '2': its weight holds NaN or infinity"):
        run(model, ["0", "2"], rank=2)
    assert type(model[0]) is nn.Linear


def test_group_that_does_not_divide_the_input_width_is_refused():
    model = mlp()
    with pytest.raises(ConfigError, match="layer '0': group size 5 does not divide the input width 32"):
        run(model, ["0"], rank=2, bits=4, group_size=5)


def test_layer_whose_factors_are_not_smaller_is_left_unchanged_and_logged():
    model = mlp()
    before = model[0].weight.detach().clone()
    log = run(model, ["0"], rank=20)  # 20 (48 + 32) = 1600 >= 48 * 32 = 1536
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before)
    assert len(log) == 1 and log[0].startswith("0: left unchanged by lowrank: its factors would not be smaller")
    assert "set skip_if_larger: false" in log[0]
    log = run(model, ["0"], rank=20, skip_if_larger=False)
    assert isinstance(model[0], CompressedLinear) and model[0].encoding.rank == 20
    assert model[0].prepare() is Kernel.DENSE  # not cheaper to run either
    assert log[0].startswith("0: lowrank rank 20 of 32")


def test_full_energy_keeps_full_rank_and_so_is_skipped():
    model = mlp()
    log = run(model, ["0"], energy=1.0)
    assert type(model[0]) is nn.Linear and "left unchanged" in log[0]


BAD_CONFIGS = {
    "none": ({}, "exactly one of rank, energy or budget, got none"),
    "two": ({"rank": 4, "energy": 0.9}, r"exactly one of rank, energy or budget, got \['rank', 'energy'\]"),
    "three": ({"rank": 4, "energy": 0.9, "budget": 0.5}, "exactly one"),
    "rank zero": ({"rank": 0}, "rank 0 is not valid: use a positive integer"),
    "rank float": ({"rank": 2.5}, "rank 2.5 is not valid"),
    "rank bool": ({"rank": True}, "rank True is not valid"),
    "energy zero": ({"energy": 0}, r"energy 0 is not valid: use a fraction in \(0, 1\]"),
    "energy above one": ({"energy": 1.5}, "energy 1.5 is not valid"),
    "energy string": ({"energy": "high"}, "energy 'high' is not valid"),
    "budget zero": ({"budget": 0.0}, r"budget 0.0 is not valid: use a fraction in \(0, 1\]"),
    "budget negative": ({"budget": -0.5}, "budget -0.5 is not valid"),
    "budget above one": ({"budget": 2}, "budget 2 is not valid"),
    "aware not bool": ({"rank": 2, "activation_aware": "yes"}, "activation_aware must be true or false"),
    "skip not bool": ({"rank": 2, "skip_if_larger": 1}, "skip_if_larger must be true or false"),
    "damp": ({"rank": 2, "damp": 2.0}, "damp 2.0 is not valid"),
    "bits": ({"rank": 2, "bits": 5}, "unsupported bit width 5"),
    "group size": ({"rank": 2, "bits": 4, "group_size": "row"}, "group_size 'row' is not valid"),
    "kernel": ({"rank": 2, "kernel": "int8_mm"}, "kernel 'int8_mm' cannot run low-rank factors"),
    "search": ({"rank": 2, "search": "best"}, "search 'best' is not valid"),
    "version": ({"rank": 2, "version": 2}, "version 2 is not supported"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_configs_raise_config_errors(name):
    data, message = BAD_CONFIGS[name]
    with pytest.raises((ConfigError, ValueError), match=message):
        LowRankConfig(**data)


@pytest.mark.parametrize("name", [n for n in BAD_CONFIGS if n != "search"])
def test_bad_configs_in_a_recipe_name_the_stage(name):
    data, message = BAD_CONFIGS[name]
    recipe = {"stages": [{"pass": "lowrank", "config": data}]}
    with pytest.raises(RecipeError, match=rf"stage 0 \(lowrank\): .*{message}"):
        compress(mlp(), recipe)


def test_unknown_field_in_a_recipe_is_refused():
    with pytest.raises(RecipeError, match=r"unknown field\(s\) \['ratio'\]"):
        compress(mlp(), {"stages": [{"pass": "lowrank", "config": {"ratio": 0.5}}]})


# ---------------------------------------------------------------- recipes and checkpoints


def test_yaml_recipe_stage_runs_through_compress(tmp_path):
    model = mlp()
    original = [model[i].weight.detach().clone() for i in (0, 2)]
    x = torch.randn(20, 32, generator=gen(7))
    reference = model(x).detach()
    path = tmp_path / "lowrank.yaml"
    path.write_text("version: 1\nname: lowrank\nstages:\n  - pass: lowrank\n    config: {energy: 0.9}\n")
    compress(model, path)
    for i, W in zip((0, 2), original):
        enc = model[i].encoding
        assert isinstance(enc, LowRankTensor)
        assert enc.rank == direct_energy_rank(np.linalg.svd(W.double().numpy(), compute_uv=False), 0.9)
    assert len(provenance(model).log) == 2
    y = model(x)
    assert float((y - reference).norm() / reference.norm()) < 0.5


def conv_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
                         nn.ReLU(), nn.Linear(10, 4, bias=False)).eval()


@pytest.mark.parametrize("config", [{"budget": 0.5}, {"budget": 0.6, "bits": 4, "group_size": "channel"}],
                         ids=["fp32", "int4"])
def test_save_and_load_give_identical_outputs(tmp_path, config):
    model = conv_net()
    compress(model, {"stages": [{"pass": "lowrank", "config": config}]})
    assert isinstance(model[0].encoding, LowRankTensor) and isinstance(model[3].encoding, LowRankTensor)
    assert isinstance(model[5].encoding, LowRankTensor) and model[5].encoding.rank == 1  # floor(b 40 / 14)
    x = torch.randn(5, 3, 6, 6, generator=gen(8))
    expected = model(x)
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", model=conv_net())
    assert isinstance(loaded[0].encoding, LowRankTensor) and loaded[0].encoding.rank == model[0].encoding.rank
    assert torch.equal(loaded(x), expected)
    for i in (0, 3):
        for name, array in model[i].encoding.arrays().items():
            assert torch.equal(loaded[i].encoding.arrays()[name], array)


@pytest.mark.slow
def test_minilm_activation_aware_beats_plain_at_equal_rank(minilm):
    import copy

    from modelpress.calibration import calibration_sentences
    from modelpress.data.corpus import corpus_splits

    sentences = list(corpus_splits(64, 16).evaluation)
    reference = minilm.encode(sentences)
    stage = {"pass": "lowrank", "targets": {"include": ["model.encoder.layer.0.*", "model.encoder.layer.1.*"],
                                             "types": ["Linear"]}}
    scores = {}
    for aware in (False, True):
        model = copy.deepcopy(minilm)
        recipe = {"stages": [{**stage, "config": {"budget": 0.6, "activation_aware": aware}}]}
        compress(model, recipe, calibration=calibration_sentences(16) if aware else None)
        assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == 12
        scores[aware] = float(torch.nn.functional.cosine_similarity(model.encode(sentences), reference).mean())
    assert scores[True] > scores[False]
