"""Quantisation-aware training: the LSQ fake-quant op against plain references, QATConfig, prepare /
convert (converted outputs equal the trained fake-quant outputs), and, on the digits CNN, 2-bit QAT
against 2-bit post-training RTN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress
from modelpress.nn.provenance import provenance
from modelpress.encodings import QuantizedTensor, QuantScheme, mse_params, quantize
from modelpress.encodings import as_matrix, grouped
from modelpress.encodings.quantized import minmax_params
from modelpress.errors import ConfigError, RecipeError
from digits import DigitsCNN, accuracy, load_digits_data, train
from modelpress.nn import CompressedConv2d, CompressedLinear, Kernel
from modelpress.passes import PASSES, QATConfig, RangeSearch, WeightQuant, convert_qat, prepare_qat
from modelpress.passes.qat import QATConv2d, QATLinear, QATModule, WeightFakeQuant, fake_quantize, lsq_grad_scale


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SCHEMES = {
    "int8-sym-channel": QuantScheme(8, True, "channel"),
    "int4-asym-g8": QuantScheme(4, False, 8),
    "int4-sym-tensor": QuantScheme(4, True, "tensor"),
    "int3-asym-channel": QuantScheme(3, False, "channel"),
    "int2-asym-channel": QuantScheme(2, False, "channel"),
    "int2-asym-tensor": QuantScheme(2, False, "tensor"),
}
SHAPES = {"linear": (6, 16), "conv": (6, 2, 2, 4)}  # both are (6, 16) matrices


def params_for(w: torch.Tensor, scheme: QuantScheme, shrink: float = 1.0):
    """Min-max scale and zero, (R, G, 1), optionally shrunk so that some weights fall outside the range."""
    return minmax_params(grouped(as_matrix(w), scheme), scheme, shrink)


# ---------------------------------------------------------------- the fake-quant op


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("shrink", [1.0, 0.6])
def test_forward_equals_quantize_then_decode(scheme, shape, shrink):
    w = torch.randn(shape, generator=gen(0))
    scale, zero = params_for(w, scheme, shrink)
    zero = zero + 0.25 * (not scheme.symmetric)  # fractional zero points are stored too
    assert torch.equal(fake_quantize(w, scale, zero, scheme), quantize(w, scheme, scale, zero).decode())


def _inside(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Plain reference of LSQ's "inside the range" mask, per element of w."""
    s, z = scale.half().float(), zero.half().float()
    v = grouped(as_matrix(w), scheme) / s
    if scheme.symmetric:
        inside = v.abs() <= scheme.midpoint - 1
    else:
        inside = (v + z >= 0) & (v + z <= scheme.qmax)
    return inside.reshape(w.shape)


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_straight_through_gradient_passes_inside_the_range_and_is_zero_outside(scheme):
    w = torch.randn(SHAPES["conv"], generator=gen(1)).requires_grad_()
    scale, zero = params_for(w.detach(), scheme, shrink=0.5)  # about a third of the weights are clipped
    upstream = torch.randn(w.shape, generator=gen(2))
    (fake_quantize(w, scale, zero, scheme) * upstream).sum().backward()
    inside = _inside(w.detach(), scale, zero, scheme)
    assert 0 < inside.sum() < inside.numel()  # both cases occur
    assert torch.equal(w.grad, upstream * inside)


def _reference_lsq(w, scale, zero, scheme):
    """LSQ written with ordinary autograd: clamp, then round with a detached residual (so clipped
    weights get no gradient and the step gets q - z from them), and the gradient-scale trick."""
    wg = grouped(as_matrix(w), scheme)
    g = 1.0 / math.sqrt(wg.shape[-1] * (scheme.midpoint - 1 if scheme.symmetric else scheme.qmax))
    s = scale * g + (scale - scale * g).detach()  # value s, gradient scaled by g
    z = zero * g + (zero - zero * g).detach()
    if scheme.symmetric:
        v = wg / s
        c = torch.clamp(v, -(scheme.midpoint - 1), scheme.midpoint - 1)
        q = c + (torch.round(c) - c).detach()
        return (q * s).reshape(w.shape)
    u = wg / s + z
    c = torch.clamp(u, scheme.qmin, scheme.qmax)
    q = c + (torch.round(c) - c).detach()
    return ((q - z) * s).reshape(w.shape)


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_gradients_match_lsq_written_with_plain_autograd(scheme):
    w = torch.randn(SHAPES["linear"], generator=gen(3))
    scale, zero = params_for(w, scheme, shrink=0.7)
    zero = zero + 0.5 * (not scheme.symmetric)
    upstream = torch.randn(w.shape, generator=gen(4))
    grads = []
    for fn in (fake_quantize, _reference_lsq):
        leaves = [t.clone().requires_grad_() for t in (w, scale, zero)]
        (fn(*leaves, scheme) * upstream).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    if scheme.symmetric:  # the zero point is the fixed midpoint: no gradient
        assert grads[0][2] is None and grads[1][2] is None
        grads = [g[:2] for g in grads]
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert grads[0][1].abs().sum() > 0


def test_lsq_scale_and_zero_gradients_by_hand_asymmetric():
    # 2-bit asymmetric, one group of four weights, step 0.5, zero point 1: levels are (q - 1) * 0.5, q in 0..3
    scheme = QuantScheme(2, False, "channel")
    w = torch.tensor([[0.3, -0.7, 1.6, -0.2]], requires_grad=True)
    scale = torch.tensor([[[0.5]]], requires_grad=True)
    zero = torch.tensor([[[1.0]]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    w_hat = fake_quantize(w, scale, zero, scheme)
    # u = w/s + z = [1.6, -0.4, 4.2, 0.6]; q = [2, 0, 3, 1]; inside = [yes, no, no, yes]
    assert w_hat.tolist() == [[0.5, -0.5, 1.0, 0.0]]
    (w_hat * upstream).sum().backward()
    g = 1 / math.sqrt(4 * 3)  # n = 4 weights share the step, Q_p = 3
    # ds: inside round(u) - u = 0.4 and 0.4; outside q - z = -1 and 2
    expected_ds = (1.0 * 0.4 + 2.0 * (-1) + (-1.0) * 2 + 0.5 * 0.4) * g
    expected_dz = (2.0 * -0.5 + (-1.0) * -0.5) * g  # outside only: -s
    torch.testing.assert_close(scale.grad.item(), expected_ds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zero.grad.item(), expected_dz, rtol=1e-6, atol=1e-6)
    assert w.grad.tolist() == [[1.0, 0.0, 0.0, 0.5]]


def test_lsq_scale_gradient_by_hand_symmetric():
    # 3-bit symmetric: signed levels -3..3 times the step 0.5
    scheme = QuantScheme(3, True, "channel")
    w = torch.tensor([[0.3, -0.7, 1.6, 0.05]])
    scale = torch.tensor([[[0.5]]], requires_grad=True)
    zero = torch.full((1, 1, 1), 4.0)
    fake_quantize(w, scale, zero, scheme).sum().backward()
    # v = [0.6, -1.4, 3.2, 0.1]: inside, inside, clipped to 3, inside
    expected = ((1 - 0.6) + (-1 + 1.4) + 3 + (0 - 0.1)) / math.sqrt(4 * 3)
    torch.testing.assert_close(scale.grad.item(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("scheme", "n", "expected"),
    [(QuantScheme(2, False), 9, 1 / math.sqrt(27)), (QuantScheme(4, True), 64, 1 / math.sqrt(448)),
     (QuantScheme(8, False, 32), 32, 1 / math.sqrt(32 * 255))],
)
def test_gradient_scale_is_one_over_sqrt_n_times_qp(scheme, n, expected):
    assert lsq_grad_scale(scheme, n) == pytest.approx(expected)


@pytest.mark.parametrize("init", list(RangeSearch))
def test_quantiser_starts_from_the_range_rtn_would_pick(init):
    w = torch.randn(8, 32, generator=gen(5))
    scheme = QuantScheme(2, False, 16)
    fq = WeightFakeQuant(w, scheme, init)
    scale, zero = mse_params(w, scheme) if init is RangeSearch.MSE else params_for(w, scheme)
    assert torch.equal(fq.scale.data, scale) and torch.equal(fq.zero.data, zero)
    assert {n for n, p in fq.named_parameters()} == {"scale", "zero"}
    assert torch.equal(fq(w), quantize(w, scheme, scale, zero).decode())


def test_symmetric_quantiser_learns_only_the_scale():
    fq = WeightFakeQuant(torch.randn(4, 8, generator=gen(6)), QuantScheme(4, True))
    assert [n for n, _ in fq.named_parameters()] == ["scale"]
    assert (fq.zero == 8).all()


# ---------------------------------------------------------------- QATConfig


def test_config_is_frozen_with_defaults():
    cfg = QATConfig()
    assert (cfg.quant, cfg.kernel, cfg.version) == (
        WeightQuant(bits=4, symmetric=False, group_size="channel", search=RangeSearch.MSE), Kernel.AUTO, 1)
    with pytest.raises(AttributeError):
        cfg.kernel = Kernel.DENSE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 2, "symmetric": True}, "2-bit symmetric"),
        ({"bits": 5}, "unsupported bit width 5"),
        ({"bits": True}, "unsupported bit width"),
        ({"group_size": "row"}, "group_size 'row' is not valid"),
        ({"group_size": -2}, "is not valid"),
        ({"kernel": "dynamic_int8"}, "dynamic_int8"),
        ({"version": 2}, "version 2 is not supported"),
        ({"symmetric": "yes"}, "symmetric must be true or false"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QATConfig(**kwargs)


@pytest.mark.parametrize(
    ("config", "message"),
    [({"init": "percentile"}, "init='percentile' is not valid"), ({"lr": 0.1}, r"unknown field\(s\) \['lr'\]"),
     ({"bits": 2, "symmetric": True}, "2-bit symmetric")],
)
def test_recipe_config_errors(config, message):
    with pytest.raises(RecipeError, match=message):
        modelpress.Recipe.from_dict({"stages": [{"pass": "qat", "config": config}]})


def test_qat_is_a_registered_pass_for_linear_and_conv():
    spec = PASSES["qat"]
    assert spec.config_type is QATConfig and set(spec.module_types) == {nn.Linear, nn.Conv2d}


# ---------------------------------------------------------------- prepare / convert


class Net(nn.Module):
    """A conv with groups and stride, a conv without bias, a LayerNorm and two Linear layers."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)  # 18 weights per channel
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)  # 8 weights per channel
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 6, 6) -> (B, 4)
        h = self.conv2(torch.relu(self.conv1(x))).mean((2, 3))  # (B, 8)
        return self.fc2(torch.relu(self.fc1(self.norm(h))))


X = torch.randn(16, 4, 6, 6, generator=gen(7))
Y = torch.randint(0, 4, (16,), generator=gen(8))
QAT_SCHEMES = {  # group sizes divide 18, 8, 8 and 16 columns
    "int2-asym-channel": QATConfig(bits=2, symmetric=False, group_size="channel", kernel="dense"),
    "int3-asym-tensor": QATConfig(bits=3, symmetric=False, group_size="tensor", kernel="dense"),
    "int4-sym-channel": QATConfig(bits=4, symmetric=True, group_size="channel", kernel="dense"),
    "int4-asym-g2": QATConfig(bits=4, symmetric=False, group_size=2, kernel="dense"),
    "int8-sym-channel-minmax": QATConfig(bits=8, symmetric=True, group_size="channel", init="minmax", kernel="dense"),
}


def fit(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()


def test_prepare_swaps_linear_and_conv_for_trainable_twins():
    model = prepare_qat(Net(), QATConfig(bits=2))
    assert isinstance(model.conv1, QATConv2d) and isinstance(model.conv2, QATConv2d)
    assert isinstance(model.fc1, QATLinear) and isinstance(model.fc2, QATLinear)
    assert type(model.norm) is nn.LayerNorm
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"conv1.weight", "conv1.bias", "conv1.weight_quant.scale", "conv1.weight_quant.zero", "fc2.weight",
            "fc2.weight_quant.scale"} <= trainable
    assert model.conv1.weight_quant.scale.shape == (8, 1, 1)  # one step per output channel
    assert "int2 asym per-channel" in repr(model)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, {"conv1", "conv2", "fc1", "fc2"}), ({"types": (nn.Linear,)}, {"fc1", "fc2"}),
     ({"ignore": ("conv1", "fc2")}, {"conv2", "fc1"}), ({"include": ("fc*",), "ignore": ("*2",)}, {"fc1"})],
)
def test_prepare_selects_like_a_recipe_stage(kwargs, expected):
    model = prepare_qat(Net(), QATConfig(bits=4), **kwargs)
    assert {n for n, m in model.named_modules() if isinstance(m, QATModule)} == expected


@pytest.mark.parametrize("name", QAT_SCHEMES)
def test_untrained_qat_model_equals_rtn_with_the_same_ranges(name):
    config = QAT_SCHEMES[name]
    qat = prepare_qat(Net(), config)
    q = config.quant
    rtn_config = {"bits": q.bits, "symmetric": q.symmetric, "group_size": q.group_size, "search": q.search.value,
                  "kernel": "dense"}
    rtn = modelpress.compress(Net(), {"stages": [{"pass": "rtn", "targets": {"types": ["Conv2d", "Linear"]},
                                                  "config": rtn_config}]})
    with torch.no_grad():
        assert torch.equal(qat(X), rtn(X))


@pytest.mark.parametrize("name", QAT_SCHEMES)
def test_converted_model_equals_the_trained_fake_quant_model(name):
    model = prepare_qat(Net(), QAT_SCHEMES[name])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model)
    assert not torch.equal(start["fc1.weight_quant.scale"], model.fc1.weight_quant.scale)  # scales learn
    assert not torch.equal(start["conv1.weight"], model.conv1.weight)
    with torch.no_grad():
        trained = model(X)
    convert_qat(model)
    assert isinstance(model.conv1, CompressedConv2d) and isinstance(model.fc2, CompressedLinear)
    assert not any(isinstance(m, QATModule) for m in model.modules())
    assert isinstance(model.conv1.encoding, QuantizedTensor) and model.conv1.encoding.scheme == QAT_SCHEMES[name].quant.scheme
    assert (model.conv1.stride, model.conv1.padding, model.conv1.groups) == ((2, 2), (1, 1), 2)
    with torch.no_grad():
        assert torch.equal(model(X), trained)


def test_auto_kernel_conversion_agrees_to_float_tolerance():
    model = prepare_qat(Net(), QATConfig(bits=8, symmetric=True))  # int8 symmetric: AUTO may pick the int8 matmul
    fit(model, steps=2)
    with torch.no_grad():
        trained = model(X)
        torch.testing.assert_close(convert_qat(model)(X), trained, rtol=1e-4, atol=1e-5)


def test_qat_recipe_composes_with_rtn_and_saves_after_conversion(tmp_path):
    recipe = {"name": "qat-int2", "stages": [
        {"pass": "rtn", "targets": {"include": ["conv1"]}, "config": {"bits": 8}},
        {"pass": "qat", "targets": {"types": ["Conv2d", "Linear"]}, "config": {"bits": 2, "kernel": "dense"},
         "overrides": {"fc2": {"bits": 4}}},
    ]}
    model = modelpress.compress(Net(), recipe)
    assert isinstance(model.conv1, CompressedConv2d) and isinstance(model.conv2, QATConv2d)
    assert model.fc2.config.quant.bits == 4 and model.fc1.config.quant.bits == 2
    fit(model, steps=3)
    with pytest.raises(ConfigError, match=r"'conv2' is still in quantisation-aware training: call convert_qat"):
        modelpress.save(model, tmp_path / "early")
    assert not (tmp_path / "early").exists()
    convert_qat(model)
    with torch.no_grad():
        expected = model(X)
    loaded = modelpress.load(modelpress.save(model, tmp_path / "ckpt"), model=Net())
    with torch.no_grad():
        assert torch.equal(loaded(X), expected)
    assert provenance(loaded).recipe == provenance(model).recipe
    assert loaded.fc2.encoding.scheme.bits == 4 and loaded.conv2.encoding.scheme.bits == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: convert_qat(Net()), "holds no QAT module"),
        (lambda: prepare_qat(Net(), QATConfig(), include=("nothing",)), "selected no layer"),
        (lambda: prepare_qat(Net(), QATConfig(), types=(nn.LayerNorm,)), "handles nn.Linear and nn.Conv2d"),
        (lambda: prepare_qat(Net(), {"bits": 2}), "takes a QATConfig"),
        (lambda: prepare_qat(Net(), QATConfig(group_size=16)), r"layer 'conv1': group size 16 does not divide .* 18"),
        (lambda: prepare_qat(nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="reflect")), QATConfig()),
         r"layer '0': conv padding_mode 'reflect'"),
    ],
)
def test_mistakes_get_one_clear_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


# ---------------------------------------------------------------- the digits CNN

FP32_EPOCHS, FP32_LR = 20, 3e-3
QAT_EPOCHS, QAT_LR = 5, 1e-3
SEEDS = (0, 1, 2)
INT2_RTN = {"name": "rtn-int2", "stages": [{"pass": "rtn", "targets": {"types": ["Conv2d", "Linear"]},
                                            "config": {"bits": 2, "symmetric": False, "search": "mse"}}]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: one intra-op thread is fastest, and immune to other jobs on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


@pytest.fixture(scope="module")
def trained(digits):
    """fp32 digits CNNs, one per seed (trained once per module)."""
    models = {}
    for seed in SEEDS:
        model = DigitsCNN(seed)
        train(model, digits, FP32_EPOCHS, FP32_LR, seed)
        models[seed] = model
    return models


def test_digits_split_is_fixed_and_stratified(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and 0 <= digits.x_train.min() and digits.x_train.max() == 1
    every = torch.cat([digits.y_train, digits.y_test])
    expected = torch.bincount(every, minlength=10) * 360 / len(every)
    assert (torch.bincount(digits.y_test, minlength=10) - expected).abs().max() < 1  # stratified by class
    again = load_digits_data()
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)


def test_digits_cnn_has_both_layer_kinds_and_38k_parameters():
    model = DigitsCNN()
    assert sum(p.numel() for p in model.parameters()) == 38282
    assert {type(m) for m in model.modules()} >= {nn.Conv2d, nn.Linear}
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert torch.equal(DigitsCNN(3).fc1.weight, DigitsCNN(3).fc1.weight)
    assert not torch.equal(DigitsCNN(3).fc1.weight, DigitsCNN(4).fc1.weight)


def test_training_is_deterministic(digits):
    runs = []
    for _ in range(2):
        model = DigitsCNN(0)
        losses = train(model, digits, epochs=2, lr=3e-3, seed=5)
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][0][1] < runs[0][0][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize("bad", [{"epochs": -1}, {"lr": 0.0}, {"batch_size": 0}, {"threads": 0}])
def test_training_arguments_are_checked(digits, bad):
    with pytest.raises(ConfigError, match="train needs"):
        train(DigitsCNN(), digits, **({"epochs": 1, "lr": 1e-3, "batch_size": 64} | bad))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_fp32_digits_cnn_is_accurate(trained, digits, seed):
    assert accuracy(trained[seed], digits) >= 0.97


@pytest.mark.slow
def test_post_training_int2_rtn_falls_below_95_percent(trained, digits):
    accs = [accuracy(modelpress.compress(copy.deepcopy(trained[s]), INT2_RTN), digits) for s in SEEDS]
    assert sum(accs) / len(accs) < 0.95, accs
    assert all(a < accuracy(trained[s], digits) for a, s in zip(accs, SEEDS))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_int2_qat_reaches_95_percent_and_beats_rtn(trained, digits, seed):
    rtn_acc = accuracy(modelpress.compress(copy.deepcopy(trained[seed]), INT2_RTN), digits)
    model = prepare_qat(copy.deepcopy(trained[seed]), QATConfig(bits=2, symmetric=False, kernel="dense"))
    train(model, digits, QAT_EPOCHS, QAT_LR, seed=100 + seed)
    with torch.no_grad():
        fake_quant_logits = model(digits.x_test)
    convert_qat(model)
    with torch.no_grad():
        assert torch.equal(model(digits.x_test), fake_quant_logits)
    compressed = [m for m in model.modules() if isinstance(m, (CompressedConv2d, CompressedLinear))]
    assert len(compressed) == 4 and all(m.encoding.scheme.bits == 2 for m in compressed)
    qat_acc = accuracy(model, digits)
    assert qat_acc >= 0.95 and qat_acc > rtn_acc, (qat_acc, rtn_acc)
