"""Quantisation-aware training (QAT) of weights with learned step sizes (LSQ, Esser et al. 2019).

QAT has three phases, and only the first and last are modelpress's:

    prepare_qat(model, QATConfig(bits=2, symmetric=False))   # Linear/Conv2d -> QATLinear/QATConv2d
    train(model, ...)                                          # your loop: weights and scales learn
    convert_qat(model)                                         # -> CompressedLinear/CompressedConv2d

A QAT module computes its output with the fake-quantised weight

    u = w / s + z,   q = clamp(round(u), q_min, q_max),   w_hat = (q - z) * s

(per group of the weight matrix, as in `encodings.quantized`), where the float weight `w`, the
step size `s` and, for asymmetric schemes, the zero point `z` are trained. Rounding has no useful
gradient, so the backward pass is LSQ's straight-through estimator:

    d w_hat / d w = 1 inside the range (q_min <= u <= q_max), 0 outside (clipped)
    d w_hat / d s = round(u) - u inside, q - z outside        (then scaled by g)
    d w_hat / d z = 0 inside, -s outside                      (then scaled by g)

(symmetric schemes: u = w / s with the signed range |u| <= 2^(b-1) - 1, and z is fixed), with
g = 1 / sqrt(n * Q_p), n the weights per step size and Q_p the largest positive level, which
keeps the step-size updates on the scale of the weight updates. The forward pass uses the scale
and zero rounded to float16 and the same rounding as `encodings.quantized.quantize`, so
`convert_qat` stores exactly the weights the model was trained with: the converted model's
outputs equal the QAT model's.

`qat` is also a registered pass, and it is exactly the prepare step: `modelpress.compress(model,
recipe)` with a `qat` stage puts those layers in QAT while other stages (e.g. `rtn` at 8 bits for
the first conv) compress the rest at once. The training loop stays the caller's, `convert_qat`
finishes the job, and `modelpress.save` refuses a model that still holds QAT modules (they are
`nn.registry.TrainingModule`s, which convert like the Linear or Conv2d they stand for).
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import QuantizedTensor, QuantScheme, RangeSearch, as_matrix, fit_ranges, grouped, quantize
from modelpress.encodings.quantized import PARAM_DTYPE, quantize_with_params
from modelpress.errors import ConfigError
from modelpress.nn import Kernel, TrainingModule, compressed_twin
from modelpress.nn.conv import CONV_GEOMETRY, conv_geometry
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.config import PassConfig, WeightQuant, pass_config
from modelpress.passes.quantize import weight_only_kernel

__all__ = [
    "QATConfig",
    "QATModule",
    "QATLinear",
    "QATConv2d",
    "WeightFakeQuant",
    "fake_quantize",
    "lsq_grad_scale",
    "prepare_qat",
    "convert_qat",
]


@pass_config
class QATConfig(PassConfig):
    """Weight-only QAT: the target scheme, how step sizes start, and the kernel of the converted Linear.

    In recipes the range search that gives the starting scale/zero is called `init` (the range RTN
    would pick, by default the error-minimising one).
    """

    QUANT_KEYS = {"bits": "bits", "symmetric": "symmetric", "group_size": "group_size", "init": "search"}

    quant: WeightQuant = WeightQuant(bits=4, symmetric=False, group_size="channel", search=RangeSearch.MSE)
    kernel: Kernel = Kernel.AUTO

    def validate(self) -> None:
        object.__setattr__(self, "kernel", weight_only_kernel(self.kernel, "QAT"))


# ---------------------------------------------------------------- the fake-quantisation op


def lsq_grad_scale(scheme: QuantScheme, n: int) -> float:
    """LSQ's step-size gradient scale 1/sqrt(n * Q_p): n weights share a step, Q_p is the top level."""
    q_p = scheme.midpoint - 1 if scheme.symmetric else scheme.qmax
    return 1.0 / math.sqrt(n * q_p)


class _LSQ(torch.autograd.Function):
    """w_hat = (clamp(round(w/s + z)) - z) s on grouped weights, with LSQ's straight-through gradients."""

    @staticmethod
    def forward(ctx, wg, scale, zero, scheme: QuantScheme, g: float):  # wg (R, G, gs); scale, zero (R, G, 1)
        s = scale.to(PARAM_DTYPE).float()  # what will be stored
        z = zero.to(PARAM_DTYPE).float()
        q = quantize_with_params(wg, s, z, scheme)  # codes in [0, 2^b), exactly as quantize() computes them
        v = wg / s  # (R, G, gs) weights in step units
        if scheme.symmetric:  # q - z spans [-lim, lim]
            lim = scheme.midpoint - 1
            inside = (v >= -lim) & (v <= lim)
        else:  # q spans [q_min, q_max]
            inside = (v + z >= scheme.qmin) & (v + z <= scheme.qmax)
        ctx.save_for_backward(v, q - z, s, inside)
        ctx.g, ctx.symmetric = g, scheme.symmetric
        return (q - z) * s

    @staticmethod
    def backward(ctx, grad):
        v, q_centered, s, inside = ctx.saved_tensors
        grad_w = grad * inside
        grad_s = (grad * torch.where(inside, q_centered - v, q_centered)).sum(-1, keepdim=True) * ctx.g
        grad_z = None  # a symmetric scheme's zero point is the fixed midpoint code
        if not ctx.symmetric:
            grad_z = (grad * torch.where(inside, torch.zeros_like(v), -s)).sum(-1, keepdim=True) * ctx.g
        return grad_w, grad_s, grad_z, None, None


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """quantize(w, scheme, scale, zero).decode(), differentiable in w, scale and zero (LSQ)."""
    m = as_matrix(w)
    wg = grouped(m, scheme)  # (R, G, gs)
    w_hat = _LSQ.apply(wg, scale, zero, scheme, lsq_grad_scale(scheme, wg.shape[-1]))
    return w_hat.reshape(w.shape)


class WeightFakeQuant(nn.Module):
    """The learned quantiser of one weight: step sizes (and zero points) per group, initialised by range search."""

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, init: RangeSearch = RangeSearch.MSE):
        super().__init__()
        self.scheme = scheme
        scale, zero = fit_ranges(weight.detach().float(), scheme, init)
        self.scale = nn.Parameter(scale.clone())  # (R, G, 1); (1, 1, 1) per tensor
        if scheme.symmetric:  # the zero point is fixed at the midpoint code
            self.register_buffer("zero", zero.clone())
        else:
            self.zero = nn.Parameter(zero.clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale.clamp_min(2**-24), self._zero(), self.scheme)

    def _zero(self) -> torch.Tensor:
        if self.scheme.symmetric:
            return self.zero
        return self.zero.clamp(self.scheme.qmin, self.scheme.qmax)

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        """The stored form of what forward(w) computes (decode() equals it exactly)."""
        return quantize(w.detach().float(), self.scheme, self.scale.clamp_min(2**-24), self._zero())

    def extra_repr(self) -> str:
        return self.scheme.describe()


# ---------------------------------------------------------------- modules in training


class QATModule(TrainingModule):
    """Base of modules in quantisation-aware training: a float weight trained through a fake quantiser."""

    not_saveable = ("is still in quantisation-aware training: call convert_qat(model) before saving, so its weight "
                    "is stored as integer codes")
    weight: nn.Parameter
    weight_quant: WeightFakeQuant
    config: QATConfig

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def to_compressed(self) -> nn.Module:
        """The compressed twin holding the trained integer codes (its bias as trained)."""
        bias = None if self.bias is None else self.bias.detach()
        return compressed_twin(self, self.weight_quant.encode(self.weight), self.config.kernel, bias)


class QATLinear(QATModule):
    """nn.Linear whose forward uses the fake-quantised weight."""

    stands_for = nn.Linear

    def __init__(self, linear: nn.Linear, config: QATConfig):
        super().__init__()
        self.in_features, self.out_features, self.config = linear.in_features, linear.out_features, config
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        self.weight_quant = WeightFakeQuant(self.weight, config.quant.scheme, config.quant.search)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QATConv2d(QATModule):
    """nn.Conv2d whose forward uses the fake-quantised weight."""

    stands_for = nn.Conv2d

    def __init__(self, conv: nn.Conv2d, config: QATConfig):
        super().__init__()
        geometry = conv_geometry(conv)  # refuses padding modes other than zeros
        self.config = config
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = (geometry[k] for k in CONV_GEOMETRY)
        self.weight = nn.Parameter(conv.weight.detach().float().clone())  # (out, in/groups, kh, kw)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().float().clone())
        self.weight_quant = WeightFakeQuant(self.weight, config.quant.scheme, config.quant.search)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


# ---------------------------------------------------------------- model surgery


@register_pass("qat", QATConfig, (nn.Linear, nn.Conv2d))
def qat(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    """The prepare step of QAT: swap each target for its trainable fake-quantised twin."""
    for t in targets:
        cfg: QATConfig = t.config
        try:
            new = QATConv2d(t.module, cfg) if isinstance(t.module, nn.Conv2d) else QATLinear(t.module, cfg)
        except ConfigError as exc:
            raise ConfigError(f"layer {t.name!r}: {exc}") from None
        model.set_submodule(t.name, new)
        context.log.append(f"{t.name}: QAT {cfg.quant.scheme.describe()} (init {cfg.quant.search.value})")


def prepare_qat(
    model: nn.Module,
    config: QATConfig | None = None,
    *,
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    include: tuple[str, ...] = ("*",),
    ignore: tuple[str, ...] = (),
) -> nn.Module:
    """Put the selected Linear/Conv2d layers of `model` into QAT in place and return it, ready to train.

    Modules are selected as a recipe stage selects them (`include`/`ignore` are fnmatch patterns
    over module names). For per-layer overrides or mixed stages, write a recipe with `qat` stages
    and apply it with `modelpress.compress(model, recipe)`: that is the same pass.
    """
    config = QATConfig() if config is None else config
    if not isinstance(config, QATConfig):
        raise ConfigError(f"prepare_qat takes a QATConfig, got {type(config).__name__}: "
                          "apply a recipe with qat stages through modelpress.compress(model, recipe)")
    if not types or not all(t in (nn.Linear, nn.Conv2d) for t in types):
        raise ConfigError(f"QAT handles nn.Linear and nn.Conv2d layers, got types {types!r}")
    targets = [
        Target(name, m, config)
        for name, m in model.named_modules()
        if name and isinstance(m, types) and _matches(name, include) and not _matches(name, ignore)
    ]
    if not targets:
        raise ConfigError(f"prepare_qat selected no layer (types {[t.__name__ for t in types]}, include {include}, "
                          f"ignore {ignore}): check the module names in model.named_modules()")
    qat(model, targets, PassContext())
    return model


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every QAT module by the compressed module holding its trained integer codes, in place."""
    names = [name for name, m in model.named_modules() if isinstance(m, QATModule)]
    if not names:
        raise ConfigError("the model holds no QAT module: call prepare_qat(model, ...) and train it first")
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_compressed())
    return model
