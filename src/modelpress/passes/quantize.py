"""Round-to-nearest weight quantisation (min-max or error-minimising ranges) and dynamic int8 (W8A8),
optionally smoothed (SmoothQuant)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from modelpress.calibration import LayerStats, calibration_sentences, run_blockwise
from modelpress.encodings import QuantScheme, quantize
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR, _grouped, as_matrix, minmax_params
from modelpress.encodings.range_search import mse_params
from modelpress.errors import CalibrationError, ConfigError
from modelpress.nn import CompressedConv2d, CompressedEmbedding, CompressedLinear, Kernel
from modelpress.nn.kernels import ACTIVATION_KERNELS
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.channel_scales import FoldMode, migrate, share_groups, target_sites, with_input_scale

__all__ = ["RangeSearch", "RTNConfig", "DynamicInt8Config", "quantize_weight", "smooth", "smooth_scale"]


class RangeSearch(str, Enum):
    MINMAX = "minmax"  # each group's full range
    MSE = "mse"  # clipping search + least-squares refinement of each group's scale and zero


@dataclass(frozen=True)
class RTNConfig:
    """Weight-only round-to-nearest quantisation; activations stay float."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | str = "channel"
    search: RangeSearch = RangeSearch.MINMAX
    kernel: Kernel = Kernel.AUTO
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", RangeSearch(self.search))
        object.__setattr__(self, "kernel", Kernel(self.kernel))
        if self.kernel in ACTIVATION_KERNELS:
            raise ConfigError(f"kernel {self.kernel.value} quantises activations: use the dynamic_int8 pass for W8A8")
        self.scheme  # validates bits and group size

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.symmetric, self.group_size)


ACTIVATION_RANGES = {"tensor": Kernel.DYNAMIC_INT8, "token": Kernel.DYNAMIC_INT8_TOKEN}
# `activations: auto` gives a layer a range per token when, over the calibration tokens, the call's
# range is typically this many times wider than the token's own (about 2.6 of 8 bits lost). Measured
# on MiniLM: FFN outputs of blocks 0-3 sit at 6-9 and gain 0.001-0.005 mean cosine each from a range
# per token; every other input sits at 2-4.5 and gains nothing measurable.
TOKEN_RANGE_RATIO = 6.0


@dataclass(frozen=True)
class DynamicInt8Config:
    """W8A8: int8 symmetric weights, activations quantised per call by fbgemm's dynamic kernel.

    `weight_bits=7` keeps every u8 x s8 pair sum inside int16 on AVX2 CPUs without VNNI, so the
    kernel can give activations their full 8-bit range; 8 forces fbgemm's reduced 7-bit activations.

    `activations: token` gives each token (row of x) its own activation range instead of one range
    for the whole call (see nn/kernels.py): for inputs where a few tokens carry huge activations;
    `auto` decides per layer from calibration (TOKEN_RANGE_RATIO), since the range per token costs
    two more passes over x.

    `smooth_alpha` turns on SmoothQuant (Xiao et al., 2023): per input channel j,
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) from calibration, the weight W diag(s) is quantised
    and the input x diag(1/s), which moves range from outlier activation channels into the
    weights. It needs calibration data (`compress(..., calibration=...)`); a sentence encoder given
    none is smoothed on `calibration_sentences(128)`.
    """

    group_size: int | str = "channel"
    weight_bits: int = 7
    search: RangeSearch = RangeSearch.MSE
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None: no smoothing, no calibration
    fold: FoldMode = FoldMode.AUTO  # where smoothing scales go (see passes/channel_scales.py)
    activations: str = "tensor"  # one activation range per call ("tensor"), per token ("token"), or "auto"
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", RangeSearch(self.search))
        object.__setattr__(self, "fold", FoldMode(self.fold))
        if self.weight_bits not in (7, 8):
            raise ConfigError(f"weight_bits {self.weight_bits} is not valid for dynamic int8: use 7 or 8")
        alpha = self.smooth_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
            raise ConfigError(f"smooth_alpha {alpha!r} is not valid: use a number in [0, 1] (e.g. 0.5) or null")
        if QuantScheme(8, True, self.group_size).group_size not in (PER_CHANNEL, PER_TENSOR):
            raise ConfigError("dynamic int8 takes group_size 'channel' or 'tensor' (fbgemm has no groups)")
        if not isinstance(self.activations, str) or self.activations not in (*ACTIVATION_RANGES, "auto"):
            raise ConfigError(f"activations {self.activations!r} is not valid: use 'tensor' (one range per call), "
                              "'token' (one range per token) or 'auto' (chosen per layer from calibration)")

    @property
    def needs_calibration(self) -> bool:
        return self.smooth_alpha is not None or self.activations == "auto"

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(8, True, self.group_size)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, search: RangeSearch, max_code: int | None = None):
    """Quantise one weight tensor; `max_code` narrows a symmetric range (7-bit values in int8 codes)."""
    if search is RangeSearch.MSE:
        scale, zero = mse_params(w, scheme)
    else:
        scale = zero = None
    if max_code is not None:  # e.g. |q| <= 63 inside int8: widen the scale, keeping the chosen clipping
        if scale is None:
            scale, zero = minmax_params(_grouped(as_matrix(w.float()), scheme), scheme)
        scale = scale * ((scheme.midpoint - 1) / max_code)
    return quantize(w, scheme, scale, zero)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    model.set_submodule(name, new)


@register_pass("rtn", RTNConfig, (nn.Linear, nn.Embedding, nn.Conv2d))
def rtn(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    for t in targets:
        cfg: RTNConfig = t.config
        try:
            enc = quantize_weight(t.module.weight.data, cfg.scheme, cfg.search)
        except ConfigError as exc:
            raise ConfigError(f"layer {t.name!r}: {exc}") from None
        if isinstance(t.module, nn.Embedding):
            new = CompressedEmbedding.from_embedding(t.module, enc)
        elif isinstance(t.module, nn.Conv2d):  # decode-once dense (cfg.kernel is for Linear layers)
            try:
                new = CompressedConv2d.from_conv(t.module, enc)
            except ConfigError as exc:
                raise ConfigError(f"layer {t.name!r}: {exc}") from None
        else:
            new = CompressedLinear.from_linear(t.module, enc, cfg.kernel)
        _replace(model, t.name, new)
        context.log.append(f"{t.name}: {cfg.scheme.describe()} ({cfg.search.value})")


@register_pass("dynamic_int8", DynamicInt8Config, (nn.Linear,))
def dynamic_int8(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    measured = [t for t in targets if t.config.needs_calibration]
    stats = measure_inputs(model, measured, context) if measured else {}
    inverses = smooth(model, [t for t in targets if t.config.smooth_alpha is not None], stats)
    for t in targets:
        cfg: DynamicInt8Config = t.config
        max_code = 63 if cfg.weight_bits == 7 else None
        enc = quantize_weight(t.module.weight.data, cfg.scheme, cfg.search, max_code)
        enc = with_input_scale(enc, inverses.get(t.name))
        kernel, why = activation_kernel(cfg.activations, stats.get(t.name))
        _replace(model, t.name, CompressedLinear.from_linear(t.module, enc, kernel))
        note = "" if cfg.smooth_alpha is None else f", smoothed (alpha {cfg.smooth_alpha:g})"
        note += ", a range per token" if kernel is Kernel.DYNAMIC_INT8_TOKEN else ""
        context.log.append(f"{t.name}: W8A8 dynamic, weights int{cfg.weight_bits} {cfg.scheme.describe()}{note}{why}")


def activation_kernel(activations: str, stats: LayerStats | None) -> tuple[Kernel, str]:
    """The dynamic kernel for an `activations` setting, and (for auto) a note saying why."""
    if activations != "auto":
        return ACTIVATION_RANGES[activations], ""
    if stats is None:  # no calibration token reached the layer (logged by the capture)
        return Kernel.DYNAMIC_INT8, " (activations auto: no calibration data reached it, one range per call)"
    ratio = stats.token_range_ratio
    kernel = Kernel.DYNAMIC_INT8_TOKEN if ratio >= TOKEN_RANGE_RATIO else Kernel.DYNAMIC_INT8
    return kernel, f" (activations auto: call range {ratio:.1f}x a typical token's)"


# ---------------------------------------------------------------------------------------------
# SmoothQuant

SMOOTH_MIN = 1e-5  # bounds of a smoothing scale, as in the SmoothQuant reference code
DEFAULT_CALIBRATION = 128  # corpus sentences a sentence encoder is smoothed on when no calibration is given


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (C,); 1 where a channel's input or weights are all zero."""
    x_max, w_max = x_max.double(), w_max.double()
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)
    dead = (x_max == 0) | (w_max == 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(SMOOTH_MIN, 1 / SMOOTH_MIN).float()


def measure_inputs(model: nn.Module, targets: list[Target], context: PassContext) -> dict[str, LayerStats]:
    """Input statistics of every target on the float model (before anything changes), by layer name.

    A sentence encoder given no calibration is measured on `calibration_sentences(128)`.
    """
    calibration = context.calibration
    if calibration is None:
        if not callable(getattr(model, "tokenize", None)):
            raise CalibrationError(
                "dynamic_int8 with smooth_alpha or activations: auto needs calibration data: call "
                "compress(..., calibration=...) with input batches, add --calibration 128 to `modelpress compress`, "
                "or set smooth_alpha: null and activations: tensor (w8a8)"
            )
        # A sentence encoder gets the corpus sentences `--calibration N` would give (disjoint from
        # every evaluation set), so that the w8a8-smooth preset works without arguments.
        calibration = calibration_sentences(DEFAULT_CALIBRATION)
        context.log.append(f"dynamic_int8 calibration: none given, using calibration_sentences"
                           f"({DEFAULT_CALIBRATION}) (pass calibration= or --calibration N to choose)")
    stats: dict[str, LayerStats] = {}

    def record(group: list[tuple[Target, LayerStats]]) -> None:
        stats.update((t.name, layer_stats) for t, layer_stats in group)

    # Scaling leaves the float model's outputs unchanged: measure everything before changing anything.
    run_blockwise(model, targets, calibration, record, context.log, pass_name="dynamic_int8 calibration",
                  hessian=False, sequential=False)
    return stats


def smooth(model: nn.Module, targets: list[Target], stats: dict[str, LayerStats]) -> dict[str, torch.Tensor]:
    """Migrate s (from each target's measured max|X_j|) into the weights and absorbers.

    Returns 1/s for each layer whose scale no op absorbs (it multiplies its input itself). Layers no
    calibration token reached (not in `stats`) are left unsmoothed.
    """
    if not targets:
        return {}
    sites = target_sites(model, targets)
    by_name = {t.name: t for t in targets if t.name in stats}
    inverses = {}
    for names in share_groups(list(by_name), sites):
        alphas = {by_name[n].config.smooth_alpha for n in names}
        if len(alphas) > 1:
            raise ConfigError(f"layers {', '.join(names)} share one channel scale but have smooth_alpha "
                              f"{sorted(alphas)}: give them one value, or use fold: explicit")
        x_max = stats[names[0]].abs_max
        w_max = torch.stack([model.get_submodule(n).weight.detach().abs().amax(0) for n in names]).amax(0)  # (C,)
        inverse = migrate(model, names, sites[names[0]], smooth_scale(x_max, w_max.float(), alphas.pop()))
        if inverse is not None:
            inverses.update(dict.fromkeys(names, inverse))
    return inverses
