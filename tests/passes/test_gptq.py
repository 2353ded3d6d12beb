"""GPTQ: the blocked algorithm against a plain column-by-column reference written here, its
reduction to RTN when inputs are uncorrelated, its gain over RTN when they are correlated, the
encoding it produces, its config, and the pass through compress() and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.nn.provenance import provenance
from modelpress.calibration import calibration_sentences
from modelpress.compress import compress
from modelpress.encodings import PER_CHANNEL, QuantizedTensor, QuantScheme, encoding_from_parts, mse_params
from modelpress.encodings import grouped
from modelpress.encodings.quantized import minmax_params, quantize_with_params
from modelpress.errors import CalibrationError, ConfigError, RecipeError
from modelpress.nn import CompressedLinear
from modelpress.passes import GPTQConfig, RangeSearch, WeightQuant, pass_for
from modelpress.passes.gptq import gptq_quantize
from modelpress.passes.linalg import inverse_cholesky, output_error
from modelpress.encodings import quantize_weight
from modelpress.recipe import Recipe

SCHEMES = [QuantScheme(4, False, 16), QuantScheme(3, False, PER_CHANNEL), QuantScheme(4, True, 32),
           QuantScheme(2, False, 8), QuantScheme(8, True, 16)]


def correlated(n: int = 512, c: int = 64, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(n, c) inputs with strongly correlated channels (16 factors plus noise) of different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, c, generator=g) * torch.linspace(0.1, 2.0, c)
    return (torch.randn(n, 16, generator=g) @ mix + 0.1 * torch.randn(n, c, generator=g)).to(dtype)


def weight(r: int = 24, c: int = 64, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(r, c, generator=torch.Generator().manual_seed(seed)).to(dtype)


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / len(X)


def reference_gptq(W, H, scheme, search, damp):
    """The plain algorithm: quantise one column, update all later columns from the inverse Hessian
    of the not-yet-quantised columns, eliminate the column from that inverse; no Cholesky, no
    blocks. Group parameters are taken from the current weights when a group starts."""
    W = W.clone()
    R, C = W.shape
    gs = scheme.group_columns(R, C)
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(C, dtype=H.dtype))
    row = QuantScheme(scheme.bits, scheme.symmetric, PER_CHANNEL)
    Q = torch.zeros_like(W)
    for j in range(C):
        if j % gs == 0:
            group = W[:, j:j + gs]
            if search is RangeSearch.MSE:
                scale, zero = mse_params(group, row)
            else:
                scale, zero = minmax_params(grouped(group.float(), row), row)
            scale, zero = scale[:, 0, 0].to(W.dtype), zero[:, 0, 0].to(W.dtype)
        q = quantize_with_params(W[:, j], scale, zero, scheme)
        Q[:, j] = (q - zero) * scale
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, None, j:]
        Hinv = Hinv - Hinv[:, j, None] * Hinv[None, j, :] / Hinv[j, j]  # eliminate column j
    return Q


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("search", list(RangeSearch))
def test_blocked_gptq_equals_the_plain_column_loop(scheme, search):
    W, H = weight(), hessian(correlated())
    expected = reference_gptq(W, H, scheme, search, damp=0.01)
    got = gptq_quantize(W, H, scheme, search, damp=0.01, block_size=128)
    torch.testing.assert_close(got.weight, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("block_size", [1, 5, 24, 64, 128])
@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.describe())
def test_block_size_does_not_change_the_result(scheme, block_size):
    # block sizes that are not multiples of the group size make groups straddle blocks
    W, H = weight(), hessian(correlated())
    base = gptq_quantize(W, H, scheme, block_size=1)
    got = gptq_quantize(W, H, scheme, block_size=block_size)
    assert torch.equal(got.codes, base.codes)
    torch.testing.assert_close(got.weight, base.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.scale, base.scale, rtol=0, atol=0)


def test_block_size_in_float32_agrees_to_float_tolerance():
    W, H = weight(dtype=torch.float32), hessian(correlated()).float()
    a = gptq_quantize(W, H, QuantScheme(4, False, 16), block_size=1)
    b = gptq_quantize(W, H, QuantScheme(4, False, 16), block_size=128)
    assert (a.codes == b.codes).float().mean() > 0.995  # a borderline rounding may flip
    assert (a.weight - b.weight).abs().max() <= a.scale.max() * 1.001


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("search", list(RangeSearch))
@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_reduce_gptq_to_rtn(scheme, search, act_order):
    W = weight(dtype=torch.float32)
    X = 3.0 * torch.eye(64)  # H = c I: no column can compensate another
    got = gptq_quantize(W, hessian(X), scheme, search, act_order=act_order)
    rtn = quantize_weight(W, scheme, search)
    assert torch.equal(got.encoding(scheme).int_codes(), rtn.int_codes())
    assert torch.equal(got.weight, rtn.decode())


@pytest.mark.parametrize("scheme", SCHEMES[:4], ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_has_lower_output_error_than_rtn_on_correlated_inputs(scheme, act_order):
    W, X = weight(dtype=torch.float32), correlated(seed=3, dtype=torch.float32)
    H = hessian(X)
    got = gptq_quantize(W, H, scheme, act_order=act_order)
    for search in RangeSearch:
        rtn = quantize_weight(W, scheme, search).decode()
        assert output_error(W, got.weight, H) < 0.8 * output_error(W, rtn, H)
        assert (X @ (W - got.weight).T).norm() < (X @ (W - rtn).T).norm()


def test_output_error_is_the_relative_output_change():
    W, X = weight(), correlated()
    W_q = W + 0.01 * weight(seed=5)
    expected = ((X @ (W - W_q).T).norm() / (X @ W.T).norm()) ** 2
    assert output_error(W, W_q, X.T @ X) == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_result_is_a_valid_quantized_tensor_decoding_exactly(scheme, act_order):
    W, H = weight(dtype=torch.float32), hessian(correlated()).float()
    got = gptq_quantize(W, H, scheme, act_order=act_order)
    enc = got.encoding(scheme)
    assert isinstance(enc, QuantizedTensor) and enc.scheme == scheme and enc.shape == W.shape
    assert torch.equal(enc.int_codes(), got.codes)
    assert torch.equal(enc.decode(), got.weight)  # what GPTQ propagated is exactly what is stored
    again = encoding_from_parts(enc.meta(), enc.arrays())  # the checkpoint's validation accepts it
    assert torch.equal(again.decode(), got.weight)
    groups = 1 if scheme.group_size == PER_CHANNEL else W.shape[1] // scheme.group_size
    assert enc.scale.shape == (W.shape[0], groups)


def test_act_order_visits_columns_by_decreasing_activation_with_static_groups():
    W, X = weight(dtype=torch.float32), correlated(dtype=torch.float32)
    X = X * torch.linspace(0.2, 3, 64).flip(0).roll(17)  # a scale order unrelated to column order
    H = hessian(X)
    scheme = QuantScheme(3, False, 16)
    plain = gptq_quantize(W, H, scheme)
    ordered = gptq_quantize(W, H, scheme, act_order=True)
    static_scale, _ = mse_params(W, scheme)  # static groups: parameters of the original weights
    assert torch.equal(ordered.scale, static_scale)
    assert not torch.equal(plain.scale, static_scale)  # lazy groups see error-updated weights
    assert not torch.equal(ordered.codes, plain.codes)
    assert output_error(W, ordered.weight, H) < output_error(W, quantize_weight(W, scheme, RangeSearch.MSE).decode(), H)


def test_dead_inputs_are_zeroed_and_harmless():
    X = correlated()
    X[:, [3, 40]] = 0  # two inputs never active: zero rows and columns in H
    W = weight()
    got = gptq_quantize(W, hessian(X), QuantScheme(4, False, 16))
    assert torch.isfinite(got.weight).all()
    live = [c for c in range(64) if c not in (3, 40)]
    expected = reference_gptq(W, hessian(X), QuantScheme(4, False, 16), RangeSearch.MSE, 0.01)
    torch.testing.assert_close(got.weight[:, live], expected[:, live], rtol=0, atol=1e-9)


def test_singular_hessian_without_damping_raises_the_damping():
    X = correlated(n=8)  # rank 8 < 64 inputs: H is singular
    got = gptq_quantize(weight(), hessian(X), QuantScheme(4, False, 16), damp=0.0)
    assert got.damp == 1e-4  # the first retry's damping, and the result is exactly GPTQ at that damping
    again = gptq_quantize(weight(), hessian(X), QuantScheme(4, False, 16), damp=1e-4)
    assert again.damp == 1e-4 and torch.equal(got.codes, again.codes) and torch.equal(got.weight, again.weight)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    H = hessian(correlated())
    U, damp = inverse_cholesky(H.clone(), 0.05)
    Hd = H + 0.05 * H.diagonal().mean() * torch.eye(64, dtype=H.dtype)
    assert damp == 0.05
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- config


def test_config_defaults_and_scheme():
    cfg = GPTQConfig()
    assert cfg.quant == WeightQuant(bits=4, symmetric=False, group_size=64, search=RangeSearch.MSE)
    assert (cfg.damp, cfg.block_size, cfg.act_order, cfg.version) == (0.01, 128, False, 1)
    assert cfg.quant.scheme == QuantScheme(4, False, 64)
    assert GPTQConfig(group_size="channel", search="minmax").quant.search is RangeSearch.MINMAX
    assert pass_for("gptq").config_type is GPTQConfig and pass_for("gptq").module_types == (nn.Linear,)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"bits": 5}, "unsupported bit width 5"),
        ({"group_size": "tensor"}, "not 'tensor'"),
        ({"group_size": 0.5}, "group_size 0.5 is not valid"),
        ({"damp": -0.1}, "damp -0.1 is not valid"),
        ({"damp": 2}, "damp 2 is not valid"),
        ({"damp": True}, "damp True is not valid"),
        ({"block_size": 0}, "block_size 0 is not valid"),
        ({"act_order": "yes"}, "act_order must be true or false"),
        ({"version": 2}, "version 2 is not supported"),
        ({"kernel": "dynamic_int8"}, "GPTQ is weight-only"),
        ({"bits": 2, "symmetric": True}, "2-bit symmetric"),
    ],
)
def test_invalid_config_is_a_config_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        GPTQConfig(**fields)


def test_invalid_config_in_a_recipe_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"stage 0 \(gptq\).*search='best'"):
        compress(nn.Linear(4, 4), {"stages": [{"pass": "gptq", "config": {"search": "best"}}]}, calibration=[])


# ---------------------------------------------------------------- the pass


class Block(nn.Module):
    """Attention (q, k, v, o) and an MLP (up, down): the Linear layers of a transformer layer."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h, attention_mask=None):  # (B, T, d), additive (B, 1, T)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5 + attention_mask
        h = self.norm(h + self.o(scores.softmax(-1) @ self.v(h)))
        return h + self.down(torch.relu(self.up(h)))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2, seed: int = 0, factors: int | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(100, d)
        if factors:  # token vectors from a few factors: correlated inputs, as in trained models
            with torch.no_grad():
                self.embed.weight.copy_(torch.randn(100, factors) @ torch.randn(factors, d) + 0.1 * torch.randn(100, d))
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.unused = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        additive = (1.0 - attention_mask[:, None, :].float()) * -1e4
        for layer in self.layers:
            h = layer(h, attention_mask=additive)
        return self.pooler(h[:, 0])


def batches(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 7:] = 0
        mask[3, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def gptq_recipe(**config):
    return {"stages": [{"pass": "gptq", "targets": {"types": ["Linear"]}, "config": {"group_size": 16, **config}}]}


def test_pass_quantises_every_reached_linear_and_logs_it():
    model, data = TinyTransformer(), batches()
    reference = copy.deepcopy(model)
    compress(model, gptq_recipe(), calibration=data)
    linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        module = model.get_submodule(name)
        if name == "unused":
            assert isinstance(module, nn.Linear)
            assert torch.equal(module.weight, reference.unused.weight)
        else:
            assert isinstance(module, CompressedLinear) and isinstance(module.encoding, QuantizedTensor)
            assert module.encoding.scheme == QuantScheme(4, False, 16)
            assert torch.equal(module.bias, reference.get_submodule(name).bias)
    log = "\n".join(provenance(model).log)
    assert "unused: skipped by gptq: no calibration token reached it, it stays float" in log
    assert sum("gptq (mse;" in line for line in provenance(model).log) == len(linears) - 1
    with torch.no_grad():
        a, b = model(**data[0]), reference(**data[0])
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.97


@pytest.mark.parametrize("bits", [3, 4])
def test_pass_beats_rtn_on_held_out_model_outputs(bits):
    data, held_out = batches(16), batches(8, seed=9)
    reference = TinyTransformer(factors=6)
    rtn = compress(TinyTransformer(factors=6), {"stages": [{"pass": "rtn", "targets": {"types": ["Linear"]},
                                                            "config": {"bits": bits, "symmetric": False,
                                                                       "group_size": 16, "search": "mse"}}]})
    gptq = compress(TinyTransformer(factors=6), gptq_recipe(bits=bits), calibration=data)
    with torch.no_grad():
        errors = {name: sum((m(**b) - reference(**b)).pow(2).sum() for b in held_out)
                  for name, m in (("rtn", rtn), ("gptq", gptq))}
    assert errors["gptq"] < 0.5 * errors["rtn"]


def test_the_quantised_layer_computes_what_calibration_saw():
    # later layers are calibrated on the quantised earlier layers: the calibration copy of a layer's
    # weight is the decoded encoding that the final module runs
    model = compress(TinyTransformer(), gptq_recipe(), calibration=batches())
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            assert torch.equal(module.weight, module.encoding.decode())


def test_pass_without_calibration_names_the_fix():
    with pytest.raises(CalibrationError, match=r"pass 'gptq' needs calibration data: .*calibration_sentences\(128\)"
                                               r".*--calibration 128"):
        compress(TinyTransformer(), gptq_recipe())


def test_group_size_that_does_not_divide_fails_before_calibration():
    recipe = {"stages": [{"pass": "gptq", "targets": {"include": ["layers.0.down"]}, "config": {"group_size": 24}}]}
    with pytest.raises(ConfigError, match=r"layer 'layers.0.down': group size 24 does not divide the input width 64"):
        compress(TinyTransformer(), recipe, calibration=object())  # never looked at


def test_per_layer_overrides_apply():
    recipe = gptq_recipe()
    recipe["stages"][0]["overrides"] = {"layers.1.*": {"bits": 8, "symmetric": True, "act_order": True}}
    model = compress(TinyTransformer(), recipe, calibration=batches())
    assert model.layers[0].q.encoding.scheme == QuantScheme(4, False, 16)
    assert model.layers[1].q.encoding.scheme == QuantScheme(8, True, 16)
    assert any("layers.1.q: int8 sym g16 gptq (mse, act_order;" in line for line in provenance(model).log)


def test_a_failure_part_way_leaves_quantised_layers_visibly_quantised():
    model = TinyTransformer()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        model.layers[0].down.bias[0] = float("inf")  # block 0's output overflows: block 1 cannot be measured
    with pytest.raises(CalibrationError, match="the input of layer 'layers.1.q' holds NaN or infinite values"):
        compress(model, gptq_recipe(), calibration=batches())
    for name in ("q", "k", "v", "o", "up", "down"):
        done, todo = model.layers[0].get_submodule(name), model.layers[1].get_submodule(name)
        assert isinstance(done, CompressedLinear)
        assert isinstance(todo, nn.Linear) and torch.equal(todo.weight, reference.layers[1].get_submodule(name).weight)


def test_rows_quantised_together_equal_rows_quantised_alone():
    W, H = weight(r=30), hessian(correlated())
    both = gptq_quantize(W, H, QuantScheme(4, False, 16), act_order=True)
    for rows in (slice(0, 12), slice(12, 30)):
        alone = gptq_quantize(W[rows], H, QuantScheme(4, False, 16), act_order=True)
        part = both.rows(rows.start, rows.stop)
        assert torch.equal(part.codes, alone.codes) and torch.equal(part.scale, alone.scale)
        torch.testing.assert_close(part.weight, alone.weight, rtol=0, atol=1e-12)


def test_a_tied_weight_stays_one_encoding():
    # A weight shared by two layers (a causal LM's embedding and output layer) is one tensor: quantising
    # it through one of them gives the other the same encoding, never a second copy or a float leftover.
    model = TinyTransformer()
    model.pooler.weight = model.layers[0].q.weight  # a tensor shared by two layers
    compress(model, {"stages": [{"pass": "gptq", "targets": {"include": ["pooler"]}, "config": {"group_size": 16}}]},
             calibration=batches())
    assert isinstance(model.pooler, CompressedLinear) and model.layers[0].q.encoding is model.pooler.encoding


# ---------------------------------------------------------------- the real MiniLM


# GPTQ on the first and last blocks and the pooler (outside the blocks); blocks 1-4 are walked
# through without targets. The other Linear layers are RTN and the embeddings stay float, so the
# slow tests stay short.
YAML = """
version: 1
name: gptq4
stages:
  - pass: gptq
    targets: {types: [Linear], include: ["model.encoder.layer.0.*", "model.encoder.layer.5.*", "model.pooler.*"]}
    config: {bits: 4, symmetric: false, group_size: 64, act_order: true}
  - pass: rtn
    targets: {types: [Linear]}
    config: {bits: 4, symmetric: false, group_size: 64, search: mse}
"""


@pytest.fixture(scope="module")
def minilm_gptq(minilm):
    return compress(copy.deepcopy(minilm), Recipe.from_yaml(YAML), calibration=calibration_sentences(16))


@pytest.mark.slow
def test_minilm_yaml_recipe_save_and_load(minilm, minilm_gptq, tmp_path):
    import modelpress
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.fidelity import fidelity

    sentences = list(corpus_splits(n_eval=100, n_calib=1).evaluation)
    assert not any(isinstance(m, nn.Linear) for m in minilm_gptq.modules())
    gptq_lines = [line for line in provenance(minilm_gptq).log if " gptq (mse, act_order; " in line]
    assert len(gptq_lines) == 13 and any(line.startswith("model.pooler.dense: ") for line in gptq_lines)
    got = minilm_gptq.encode(sentences)
    assert fidelity(minilm.encode(sentences), got, n_queries=50).mean_cosine > 0.97
    path = modelpress.save(minilm_gptq, tmp_path / "gptq4")
    reloaded = modelpress.load(path)
    assert torch.equal(reloaded.encode(sentences), got)


@pytest.mark.slow
def test_minilm_through_the_cli(minilm_gptq, tmp_path):
    import modelpress
    from modelpress.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(YAML)
    out = tmp_path / "out"
    assert main(["compress", "minilm", "--recipe", str(recipe), "--calibration", "16", "--out", str(out)]) == 0
    from_cli = modelpress.load(out)
    sentences = calibration_sentences(40)[:8]
    assert torch.equal(from_cli.encode(sentences), minilm_gptq.encode(sentences))  # the same calibration data


@pytest.mark.slow
def test_cli_without_calibration_is_one_line_naming_the_option(tmp_path, capsys):
    from modelpress.cli import EXIT_USER_ERROR, main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(YAML)
    assert main(["compress", "minilm", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--calibration 128" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_callers_thread_count_is_restored():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compress(TinyTransformer(), gptq_recipe(), calibration=batches(1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
