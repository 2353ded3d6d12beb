"""SmoothQuant in the dynamic_int8 pass: the scales against the formula computed here from hooked
activations, the float model unchanged by smoothing alone, the dynamic int8 kernel with an input
multiply against a plain computation, smoothing's gain on outlier channels, save/load of a
smoothed tiny BertModel, the errors (no calibration, NaN activations, unknown architecture,
bad alpha), and the w8a8-smooth preset on the real MiniLM (slow)."""

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
from modelpress.nn import CompressedLinear, Kernel
from modelpress.nn.kernels import prepare, supports
from modelpress.passes import DynamicInt8Config, PassContext, RangeSearch, Target
from modelpress.passes.channel_scales import Absorber, Site, input_multiply, migrate
from modelpress.encodings import quantize_weight
from modelpress.passes.quantize import TOKEN_RANGE_RATIO, measure_inputs, smooth, smooth_scale
from modelpress.recipe import Recipe

transformers = pytest.importorskip("transformers")

from _tiny_bert import bert_batches, run, tiny_bert  # noqa: E402


def batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return bert_batches(n, seed)


def recipe(alpha: float | None = 0.5, **config) -> dict:
    return {"name": "sq", "stages": [{"pass": "dynamic_int8", "targets": {"types": ["Linear"]},
                                      "config": {"smooth_alpha": alpha, **config}}]}


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def targets(model: nn.Module, alpha: float = 0.5, **config) -> list[Target]:
    cfg = DynamicInt8Config(smooth_alpha=alpha, **config)
    return [Target(n, model.get_submodule(n), cfg) for n in linears(model)]


# ---------------------------------------------------------------------------------------------- the formula


def test_smooth_scale_is_the_formula():
    x_max = torch.tensor([4.0, 1.0, 0.0, 9.0, 2.0])
    w_max = torch.tensor([0.25, 1.0, 3.0, 0.0, 0.5])
    s = smooth_scale(x_max, w_max, 0.5)
    assert s.tolist() == pytest.approx([4.0, 1.0, 1.0, 1.0, 2.0])  # dead channels (x or w all zero) keep 1
    assert smooth_scale(x_max, w_max, 1.0)[0] == pytest.approx(4.0)
    assert smooth_scale(x_max, w_max, 0.0)[0] == pytest.approx(4.0)  # 1 / 0.25
    assert smooth_scale(torch.tensor([1e9]), torch.tensor([1e-9]), 0.5).item() == pytest.approx(1e5)  # bounded


def hooked_abs_max(model: nn.Module, calibration) -> dict[str, torch.Tensor]:
    """max |x_j| of every Linear's input over the real (unpadded) tokens, by plain forward hooks."""
    found: dict[str, torch.Tensor] = {}
    mask = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            x = x[mask["m"]] if x.dim() == 3 else x  # (N, C) real tokens; the pooler sees (B, C) first tokens
            found[name] = torch.maximum(found.get(name, torch.zeros(x.shape[-1])), x.abs().amax(0))
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in linears(model)]
    try:
        for batch in calibration:
            mask["m"] = batch["attention_mask"].bool()
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return found


def test_scales_match_the_formula_on_hooked_activations():
    model = tiny_bert()
    x_max = hooked_abs_max(model, batches())
    w_max = {n: model.get_submodule(n).weight.detach().abs().amax(0) for n in linears(model)}
    ts = targets(model, 0.5)
    inverses = smooth(model, ts, measure_inputs(model, ts, PassContext(calibration=batches())))
    folded = "encoder.layer.0.attention.output.dense"
    assert folded not in inverses and len(inverses) == len(linears(model)) - 2  # two attention outputs fold into v
    for name, inverse in inverses.items():
        expected = (x_max[name].double().sqrt() / w_max[name].double().sqrt()).float()
        torch.testing.assert_close(1 / inverse, expected, rtol=1e-5, atol=0)


def test_smoothing_alone_leaves_the_float_model_unchanged():
    model = tiny_bert()
    reference = [run(model, b) for b in batches(2, seed=5)]
    ts = targets(model, 0.8)
    inverses = smooth(model, ts, measure_inputs(model, ts, PassContext(calibration=batches())))
    for name, inverse in inverses.items():
        input_multiply(model, name, inverse)
    for b, expected in zip(batches(2, seed=5), reference):
        torch.testing.assert_close(run(model, b), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the kernel


def test_dynamic_int8_kernel_multiplies_its_input_first():
    g = torch.Generator().manual_seed(0)
    W, bias, x = torch.randn(24, 32, generator=g), torch.randn(24, generator=g), torch.randn(5, 7, 32, generator=g)
    inverse = torch.rand(32, generator=g) + 0.1
    inner = quantize_weight(W, QuantScheme(8, True, "channel"), RangeSearch.MSE, max_code=63)
    scaled = ChannelScaledTensor(inner, inverse)
    assert supports(Kernel.DYNAMIC_INT8, scaled)
    assert not supports(Kernel.DYNAMIC_INT8, ChannelScaledTensor(quantize_weight(W, QuantScheme(4, False, 16),
                                                                                RangeSearch.MSE), inverse))
    expected = prepare(Kernel.DYNAMIC_INT8, inner, bias)(x * inverse)
    assert torch.equal(prepare(Kernel.DYNAMIC_INT8, scaled, bias)(x), expected)
    dense = prepare(Kernel.DENSE, scaled, bias)(x)  # what the weight stands for, activations in float
    assert (expected - dense).abs().max() < 0.05 * dense.abs().max()


# ---------------------------------------------------------------------------------------------- the pass


class Outliers(nn.Module):
    """One Linear on inputs with a few huge channels: what SmoothQuant is for."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 48)

    def forward(self, x):
        return self.fc(x)


def outlier_batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(128, 64, generator=g)
        x[:, [5, 20, 33]] *= 60
        out.append(x)
    return out


def test_smoothing_lowers_the_error_on_outlier_channels():
    torch.manual_seed(0)
    model = Outliers().eval()
    plain = compress(copy.deepcopy(model), recipe(None))
    smoothed = compress(copy.deepcopy(model), recipe(0.5, fold="explicit"), calibration=outlier_batches(2, 0))
    assert isinstance(smoothed.fc.encoding, ChannelScaledTensor)
    x = outlier_batches(1, 9)[0]
    with torch.no_grad():
        reference = model(x)
        err = lambda m: float((m(x) - reference).pow(2).sum())  # noqa: E731
        assert err(smoothed) < 0.5 * err(plain)


def test_pass_on_a_tiny_bert_folds_the_attention_output_and_keeps_the_rest_explicit():
    model = compress(tiny_bert(), recipe(0.5), calibration=batches())
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            assert module.kernel is Kernel.DYNAMIC_INT8
            folded = name.endswith("attention.output.dense")
            assert isinstance(module.encoding, QuantizedTensor if folded else ChannelScaledTensor), name
    assert sum("smoothed (alpha 0.5)" in line for line in provenance(model).log) == 13


def test_without_smoothing_no_calibration_is_needed():
    model = compress(tiny_bert(), recipe(None))
    assert all(isinstance(m.encoding, QuantizedTensor) for m in model.modules() if isinstance(m, CompressedLinear))


def test_save_and_load_give_identical_outputs(tmp_path):
    model = compress(tiny_bert(), recipe(0.5), calibration=batches())
    path = save(model, tmp_path / "sq")
    reloaded = load(path, model=tiny_bert(seed=3))
    for b in batches(2, seed=4):
        assert torch.equal(run(reloaded, b), run(model, b))


def test_a_folded_layernorm_survives_save_and_load(tmp_path):
    """A LayerNorm that absorbed a scale is an ordinary parameter of the checkpoint."""

    class PreNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(self.norm(x))

    torch.manual_seed(0)
    model = PreNorm().eval()
    migrate(model, ["fc"], Site(Absorber.LAYERNORM, "norm", ""), torch.rand(16) * 3 + 0.2)
    compress(model, recipe(None))
    reloaded = load(save(model, tmp_path / "ln"), model=PreNorm())
    assert torch.equal(reloaded.norm.weight, model.norm.weight) and not torch.equal(model.norm.weight, torch.ones(16))
    x = torch.randn(4, 16)
    assert torch.equal(reloaded(x), model(x))


def test_without_calibration_a_model_without_a_tokenizer_names_the_fix():
    with pytest.raises(CalibrationError, match=r"smooth_alpha.*--calibration 128.*smooth_alpha: null"):
        compress(tiny_bert(), recipe(0.5))


def test_nan_activations_are_a_calibration_error():
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.bias[0] = float("inf")
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        compress(model, recipe(0.5), calibration=batches())


def test_unknown_architecture_is_refused_unless_explicit():
    with pytest.raises(UnsupportedError, match="fold: explicit"):
        compress(Outliers(), recipe(0.5), calibration=outlier_batches(1, 0))


def test_layers_sharing_an_absorber_must_share_alpha():
    model = tiny_bert()
    stage = {"pass": "dynamic_int8", "targets": {"types": ["Linear"]}, "config": {"smooth_alpha": 0.5},
             "overrides": {"*.attention.output.dense": {"smooth_alpha": 0.7}}}
    done = compress(model, {"stages": [stage]}, calibration=batches())  # the attention output alone: fine
    assert "smoothed (alpha 0.7)" in " ".join(provenance(done).log)


def test_per_token_activations_choose_the_per_token_kernel_and_survive_save_and_load(tmp_path):
    stage = {"pass": "dynamic_int8", "targets": {"types": ["Linear"]}, "config": {"smooth_alpha": None},
             "overrides": {"*.output.dense": {"activations": "token"}, "*.attention.output.dense": {"activations": "tensor"}}}
    model = compress(tiny_bert(), {"stages": [stage]})
    kernels = {n: m.kernel for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert {n for n, k in kernels.items() if k is Kernel.DYNAMIC_INT8_TOKEN} == {
        f"encoder.layer.{i}.output.dense" for i in range(2)}
    assert sum("a range per token" in line for line in provenance(model).log) == 2
    reloaded = load(save(model, tmp_path / "token"), model=tiny_bert(seed=3))
    assert reloaded.encoder.layer[0].output.dense.kernel is Kernel.DYNAMIC_INT8_TOKEN
    for b in batches(2, seed=4):
        assert torch.equal(run(reloaded, b), run(model, b))


def test_auto_activations_give_a_range_per_token_where_calibration_shows_outlier_tokens():
    """An input whose tokens differ in size by 100x gets a range per token; one of even tokens does not."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.even, self.spiky = nn.Linear(16, 8), nn.Linear(16, 8)

        def forward(self, x):
            spikes = torch.ones(x.shape[0], 1)
            spikes[::8] = 100.0  # one token in eight is 100x larger
            return self.even(x) + self.spiky(x * spikes)

    torch.manual_seed(0)
    calibration = [torch.randn(32, 16) for _ in range(3)]
    stage = {"pass": "dynamic_int8", "targets": {"types": ["Linear"]}, "config": {"activations": "auto"}}
    model = compress(TwoInputs(), {"stages": [stage]}, calibration=calibration)
    assert model.spiky.kernel is Kernel.DYNAMIC_INT8_TOKEN and model.even.kernel is Kernel.DYNAMIC_INT8
    log = " ".join(provenance(model).log)
    assert "spiky: W8A8 dynamic" in log and "activations auto: call range" in log


def test_token_range_ratio_is_the_median_of_batch_max_over_token_max():
    from modelpress.calibration import LayerStats

    stats = LayerStats.empty(2, hessian=False)
    stats.update(torch.tensor([[1.0, -2.0], [0.5, 0.0], [-8.0, 1.0]]))  # token maxima 2, 0.5, 8: ratios 4, 16, 1
    assert stats.token_range_ratio == 4.0
    stats.update(torch.tensor([[3.0, 3.0]]))  # alone in its batch: 1
    assert stats.token_range_ratio == 1.0  # median of (1, 1, 4, 16): torch takes the lower middle
    assert TOKEN_RANGE_RATIO > 1


@pytest.mark.parametrize("activations", ["column", "", None, ["token"]])
def test_invalid_activation_ranges_are_a_config_error(activations):
    with pytest.raises(ConfigError, match="activations .* use 'tensor'"):
        DynamicInt8Config(activations=activations)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "half"])
def test_invalid_alpha_is_a_config_error(alpha):
    with pytest.raises(ConfigError, match="smooth_alpha"):
        DynamicInt8Config(smooth_alpha=alpha)
    with pytest.raises(RecipeError, match="smooth_alpha"):
        Recipe.from_dict(recipe(alpha))


# ---------------------------------------------------------------------------------------------- the real MiniLM


@pytest.mark.slow
def test_minilm_w8a8_smooth_preset_saves_and_loads(minilm, tmp_path):
    import modelpress
    from modelpress.calibration import calibration_sentences
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.fidelity import fidelity

    sentences = list(corpus_splits(n_eval=100, n_calib=1).evaluation)
    model = compress(copy.deepcopy(minilm), "w8a8-smooth", calibration=calibration_sentences(16))
    got = model.encode(sentences)
    assert fidelity(minilm.encode(sentences), got, n_queries=50).mean_cosine > 0.99
    reloaded = modelpress.load(modelpress.save(model, tmp_path / "w8a8s"))
    assert torch.equal(reloaded.encode(sentences), got)
    assert isinstance(reloaded.model.encoder.layer[0].intermediate.dense.encoding, ChannelScaledTensor)
    assert reloaded.model.encoder.layer[0].output.dense.kernel is Kernel.DYNAMIC_INT8_TOKEN  # FFN output
    assert reloaded.model.encoder.layer[0].attention.output.dense.kernel is Kernel.DYNAMIC_INT8


@pytest.mark.slow
def test_minilm_w8a8_smooth_without_calibration_uses_the_default_sentences(minilm):
    model = compress(copy.deepcopy(minilm), "w8a8-smooth")
    assert any("using calibration_sentences(128)" in line for line in provenance(model).log)
