"""AWQ: the scale search against a brute-force reference written here (explicit activations, no
Hessian), never worse than RTN and better on inputs with outlier channels, the pass on a tiny
transformers BertModel (folded vs explicit scales, save/load, errors), and the config."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.nn.provenance import provenance
from modelpress.compress import compress
from modelpress.encodings import QuantizedTensor, QuantScheme
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.errors import CalibrationError, ConfigError, RecipeError, UnsupportedError
from modelpress.formats.checkpoint import load, save
from modelpress.nn import CompressedLinear
from modelpress.passes import AWQConfig, RangeSearch, WeightQuant
from modelpress.passes.awq import awq_scale, awq_search, output_error_sum
from modelpress.encodings import quantize_weight
from modelpress.recipe import Recipe

transformers = pytest.importorskip("transformers")

from _tiny_bert import bert_batches, run, tiny_bert  # noqa: E402


def outlier_inputs(n: int = 256, c: int = 64, seed: int = 0, outliers=(3, 17, 40)) -> torch.Tensor:
    """(n, c) activations where a few channels are 20-50x larger than the rest (as in transformers)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, c, generator=g)
    for k, j in enumerate(outliers):
        X[:, j] *= 20 + 15 * k
    return X


def layer_weight(r: int = 32, c: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(r, c, generator=torch.Generator().manual_seed(seed)) * 0.1


def reference_search(W: torch.Tensor, X: torch.Tensor, scheme: QuantScheme, grid: int):
    """Brute force, written from the method's definition: every alpha, the output error measured
    on the activations themselves, ||X W^T - X W_eff^T||^2."""
    mean = X.abs().mean(0).clamp_min(1e-4)
    best = None
    for i in range(grid):
        alpha = i / grid
        s = mean.double() ** alpha
        s = (s / torch.sqrt(s.max() * s.min())).float()
        W_eff = quantize_weight(W * s, scheme, RangeSearch.MSE).decode() / s
        err = float(((X.double() @ (W - W_eff).double().T) ** 2).sum())
        if best is None or err < best[1]:
            best = (alpha, err)
    return best


@pytest.mark.parametrize("scheme", [QuantScheme(4, False, 16), QuantScheme(3, False, 32), QuantScheme(4, True, "channel")])
def test_search_equals_the_brute_force_reference(scheme):
    W, X = layer_weight(), outlier_inputs()
    result = awq_search([W], X.T @ X, X.abs().mean(0), scheme, RangeSearch.MSE, grid=10)
    alpha, err = reference_search(W, X, scheme, grid=10)
    assert result.alpha == alpha
    assert result.error == pytest.approx(err, rel=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_outlier_channels_and_never_loses(bits):
    W, X = layer_weight(), outlier_inputs()
    scheme = QuantScheme(bits, False, 16)
    H = X.T @ X
    result = awq_search([W], H, X.abs().mean(0), scheme, RangeSearch.MSE, grid=20)
    rtn = output_error_sum([W], [quantize_weight(W, scheme, RangeSearch.MSE).decode()], H)
    assert result.unscaled_error == pytest.approx(rtn, rel=1e-6)  # alpha = 0 is RTN
    assert result.error <= rtn
    assert result.error < 0.8 * rtn and result.alpha > 0  # it really helps on outliers


def test_uniform_inputs_keep_the_scale_at_one():
    W = layer_weight()
    X = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    result = awq_search([W], X.T @ X, torch.ones(64), QuantScheme(4, False, 16), grid=8)
    assert torch.equal(result.scale, torch.ones(64))  # mean|x| equal everywhere: s = 1 for every alpha


def test_scale_is_normalised_and_the_power_of_the_mean():
    mean = torch.tensor([0.0, 0.5, 2.0, 8.0])
    s = awq_scale(mean, 0.5)
    expected = mean.clamp_min(1e-4).double().sqrt()
    expected = expected / torch.sqrt(expected.max() * expected.min())
    torch.testing.assert_close(s, expected.float())
    assert torch.equal(awq_scale(mean, 0.0), torch.ones(4))


def test_layers_sharing_a_scale_minimise_their_summed_error():
    X = outlier_inputs()
    Ws = [layer_weight(seed=5), layer_weight(16, seed=6)]
    scheme = QuantScheme(4, False, 16)
    shared = awq_search(Ws, X.T @ X, X.abs().mean(0), scheme, grid=10)
    alone = [awq_search([W], X.T @ X, X.abs().mean(0), scheme, grid=10) for W in Ws]
    assert shared.error >= sum(r.error for r in alone) - 1e-3  # one shared alpha cannot beat two free ones
    assert [e.shape for e in shared.encodings] == [(32, 64), (16, 64)]


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults():
    cfg = AWQConfig()
    assert cfg.quant == WeightQuant(bits=4, symmetric=False, group_size=64, search=RangeSearch.MSE)
    assert (cfg.grid, cfg.fold.value) == (20, "auto")


@pytest.mark.parametrize("fields, message", [
    ({"grid": 0}, "grid"), ({"grid": True}, "grid"), ({"grid": 2.5}, "grid"),
    ({"kernel": "dynamic_int8"}, "weight-only"), ({"bits": 5}, "bit width"), ({"group_size": "rows"}, "group_size"),
    ({"fold": "sideways"}, "sideways"), ({"version": 2}, "version"),
])
def test_invalid_config_is_a_config_error(fields, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        AWQConfig(**fields)


def test_invalid_config_in_a_recipe_is_a_recipe_error():
    with pytest.raises(RecipeError, match="grid"):
        Recipe.from_dict({"stages": [{"pass": "awq", "config": {"grid": -1}}]})


# ---------------------------------------------------------------------------------------------- the pass on a tiny BERT


def batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return bert_batches(n, seed)


def recipe(**config) -> dict:
    base = {"bits": 4, "group_size": 16, "grid": 10, "kernel": "dense"}
    return {"name": "awq", "stages": [{"pass": "awq", "targets": {"types": ["Linear"]}, "config": {**base, **config}}]}


@pytest.fixture(scope="module")
def bert_and_awq():
    model = tiny_bert()
    return model, compress(copy.deepcopy(model), recipe(), calibration=batches())


def test_pass_quantises_every_linear_and_folds_where_it_can(bert_and_awq):
    _, model = bert_and_awq
    assert not any(type(m) is nn.Linear for m in model.modules())
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            folded = name.endswith("attention.output.dense")
            assert isinstance(module.encoding, QuantizedTensor if folded else ChannelScaledTensor), name
            inner = module.encoding if folded else module.encoding.inner
            assert inner.scheme == QuantScheme(4, False, 16)
    lines = [line for line in provenance(model).log if " awq (alpha " in line]
    assert len(lines) == 13
    assert any("scale into encoder.layer.0.attention.self.value" in line for line in lines)


def test_pass_beats_rtn_on_held_out_outputs(bert_and_awq):
    float_model, model = bert_and_awq
    rtn = compress(copy.deepcopy(float_model), {"stages": [{"pass": "rtn", "targets": {"types": ["Linear"]}, "config": {
        "bits": 4, "symmetric": False, "group_size": 16, "search": "mse", "kernel": "dense"}}]})
    held_out = batches(4, seed=7)
    err = lambda m: sum(float((run(m, b) - run(float_model, b)).pow(2).sum()) for b in held_out)  # noqa: E731
    assert err(model) < err(rtn)


def test_folded_model_equals_the_explicit_one(bert_and_awq):
    """The value projection absorbing the attention output's scale computes what an explicit multiply does."""
    float_model, folded = bert_and_awq
    explicit = compress(copy.deepcopy(float_model), recipe(fold="explicit"), calibration=batches())
    assert isinstance(explicit.get_submodule("encoder.layer.0.attention.output.dense").encoding, ChannelScaledTensor)
    for b in batches(2, seed=9):
        quantisation = (run(explicit, b) - run(float_model, b)).abs().max()
        assert (run(folded, b) - run(explicit, b)).abs().max() <= 0.05 * quantisation


def test_save_and_load_give_identical_outputs(bert_and_awq, tmp_path):
    _, model = bert_and_awq
    path = save(model, tmp_path / "awq")
    reloaded = load(path, model=tiny_bert(seed=1))  # a differently initialised skeleton
    for b in batches(2, seed=11):
        assert torch.equal(run(reloaded, b), run(model, b))
    value = "encoder.layer.1.attention.self.value"
    assert torch.equal(reloaded.get_submodule(value).bias, model.get_submodule(value).bias)  # the folded bias


def test_without_calibration_names_the_fix():
    with pytest.raises(CalibrationError, match="calibration_sentences|--calibration 128"):
        compress(tiny_bert(), recipe())


def test_nan_activations_are_a_calibration_error():
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].attention.output.LayerNorm.weight[3] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        compress(model, recipe(), calibration=batches())


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_unknown_architecture_is_refused_unless_explicit():
    torch.manual_seed(0)
    model = Plain().eval()
    calibration = [outlier_inputs(64, 32, seed=i, outliers=(1, 9)) for i in range(3)]
    with pytest.raises(UnsupportedError, match="fold: explicit"):
        compress(copy.deepcopy(model), recipe(), calibration=calibration)
    done = compress(copy.deepcopy(model), recipe(fold="explicit"), calibration=calibration)
    assert all(isinstance(m.encoding, ChannelScaledTensor) for m in (done.up, done.down))
    x = outlier_inputs(64, 32, seed=5, outliers=(1, 9))
    rtn = compress(copy.deepcopy(model), {"stages": [{"pass": "rtn", "config": {
        "bits": 4, "symmetric": False, "group_size": 16, "search": "mse", "kernel": "dense"}}]})
    with torch.no_grad():
        assert (done(x) - model(x)).pow(2).sum() < (rtn(x) - model(x)).pow(2).sum()


def test_group_size_that_does_not_divide_fails_before_calibration():
    with pytest.raises(ConfigError, match="does not divide"):
        compress(tiny_bert(), recipe(group_size=24))  # no calibration given: the group check comes first


# ---------------------------------------------------------------------------------------------- the real MiniLM


@pytest.mark.slow
def test_minilm_awq_beats_rtn_and_saves_and_loads(minilm, tmp_path):
    import modelpress
    from modelpress.calibration import calibration_sentences
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.fidelity import fidelity

    def stage(pass_name: str) -> dict:  # blocks 0 and 5 only, so the test stays short
        return {"stages": [{"pass": pass_name, "targets": {"types": ["Linear"], "include": [
            "model.encoder.layer.0.*", "model.encoder.layer.5.*"]}, "config": {
            "bits": 3, "symmetric": False, "group_size": 64, "search": "mse", **({"grid": 10} if pass_name == "awq" else {})}}]}

    sentences = list(corpus_splits(n_eval=100, n_calib=1).evaluation)
    reference = minilm.encode(sentences)
    awq = compress(copy.deepcopy(minilm), stage("awq"), calibration=calibration_sentences(16))
    rtn = compress(copy.deepcopy(minilm), stage("rtn"))
    got = awq.encode(sentences)
    assert fidelity(reference, got, n_queries=50).mean_cosine > fidelity(reference, rtn.encode(sentences),
                                                                         n_queries=50).mean_cosine
    reloaded = modelpress.load(modelpress.save(awq, tmp_path / "awq3"))
    assert torch.equal(reloaded.encode(sentences), got)
