"""Round-to-nearest weight quantisation (min-max or error-minimising ranges) and dynamic int8 (W8A8),
optionally smoothed (SmoothQuant)."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.calibration import LayerStats, calibration_sentences, run_blockwise
from modelpress.encodings import PER_CHANNEL, PER_TENSOR, RangeSearch, quantize_weight
from modelpress.errors import CalibrationError, ConfigError
from modelpress.nn import Kernel, install
from modelpress.nn.kernels import ACTIVATION_KERNELS
from modelpress.passes.base import PassContext, Target, install_tied, register_pass, tied_partners
from modelpress.passes.channel_scales import FoldMode, migrate, share_groups, target_sites, with_input_scale
from modelpress.passes.config import PassConfig, WeightQuant, enum_value, pass_config

__all__ = ["RTNConfig", "DynamicInt8Config", "check_groups", "measure_inputs", "smooth", "smooth_scale",
           "weight_only_kernel"]


def weight_only_kernel(kernel: Kernel | str, technique: str) -> Kernel:
    """`kernel` as a Kernel, refused where it would quantise activations (a weight-only technique's kernel)."""
    kernel = enum_value(Kernel, kernel, "kernel")
    if kernel in ACTIVATION_KERNELS:
        raise ConfigError(f"kernel {kernel.value} quantises activations: {technique} is weight-only; use kernel auto, "
                          "or the dynamic_int8 pass for W8A8")
    return kernel


@pass_config
class RTNConfig(PassConfig):
    """Weight-only round-to-nearest quantisation; activations stay float."""

    quant: WeightQuant = WeightQuant(bits=8, symmetric=True, group_size="channel", search=RangeSearch.MINMAX)
    kernel: Kernel = Kernel.AUTO  # for Linear layers (embeddings and convolutions choose their own)

    def validate(self) -> None:
        object.__setattr__(self, "kernel", weight_only_kernel(self.kernel, "RTN"))


def check_groups(targets: list[Target]) -> None:
    """Fail on a group size that does not divide a layer's input width, before any calibration work."""
    for t in targets:
        try:
            t.config.quant.scheme.group_columns(t.module.out_features, t.module.in_features)
        except ConfigError as exc:
            raise ConfigError(f"layer {t.name!r}: {exc}") from None


ACTIVATION_RANGES = {"tensor": Kernel.DYNAMIC_INT8, "token": Kernel.DYNAMIC_INT8_TOKEN,
                     "row": Kernel.DYNAMIC_INT8_ROW}
# `activations: auto` gives a layer a range per token when, over the calibration tokens, the call's
# range is typically this many times wider than the token's own (about 2.6 of 8 bits lost). Measured
# on MiniLM: FFN outputs of blocks 0-3 sit at 6-9 and gain 0.001-0.005 mean cosine each from a range
# per token; every other input sits at 2-4.5 and gains nothing measurable.
TOKEN_RANGE_RATIO = 6.0


@pass_config
class DynamicInt8Config(PassConfig):
    """W8A8: int8 symmetric weights, activations quantised per call by fbgemm's dynamic kernel.

    `weight_bits=7` keeps every u8 x s8 pair sum inside int16 on AVX2 CPUs without VNNI, so the
    kernel can give activations their full 8-bit range; 8 forces fbgemm's reduced 7-bit activations.

    `activations: token` gives each token (row of x) its own activation range instead of one range
    for the whole call (see nn/kernels.py): for inputs where a few tokens carry huge activations;
    `row` gives each row a symmetric range of its own, rows independent of each other, in arithmetic
    the ONNX export reproduces bit for bit (nn/kernels.py quantize_rows); `auto` decides per layer
    from calibration (TOKEN_RANGE_RATIO), since the range per token costs two more passes over x.

    `smooth_alpha` turns on SmoothQuant (Xiao et al., 2023): per input channel j,
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) from calibration, the weight W diag(s) is quantised
    and the input x diag(1/s), which moves range from outlier activation channels into the
    weights. It needs calibration data (`compress(..., calibration=...)`); a sentence encoder given
    none is smoothed on `calibration_sentences(128)`.
    """

    QUANT_KEYS = {"group_size": "group_size", "search": "search"}  # int8 symmetric weights, always

    quant: WeightQuant = WeightQuant(bits=8, symmetric=True, group_size="channel", search=RangeSearch.MSE)
    weight_bits: int = 7
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None: no smoothing, no calibration
    fold: FoldMode = FoldMode.AUTO  # where smoothing scales go (see passes/channel_scales.py)
    activations: str = "tensor"  # one range per call ("tensor"), per token ("token", "row"), or "auto"

    def validate(self) -> None:
        object.__setattr__(self, "fold", enum_value(FoldMode, self.fold, "fold"))
        if self.quant.bits != 8 or not self.quant.symmetric:
            raise ConfigError("dynamic int8 stores int8 symmetric weights: leave bits and symmetric as they are")
        if self.weight_bits not in (7, 8):
            raise ConfigError(f"weight_bits {self.weight_bits} is not valid for dynamic int8: use 7 or 8")
        alpha = self.smooth_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
            raise ConfigError(f"smooth_alpha {alpha!r} is not valid: use a number in [0, 1] (e.g. 0.5) or null")
        if self.quant.scheme.group_size not in (PER_CHANNEL, PER_TENSOR):
            raise ConfigError("dynamic int8 takes group_size 'channel' or 'tensor' (fbgemm has no groups)")
        if not isinstance(self.activations, str) or self.activations not in (*ACTIVATION_RANGES, "auto"):
            raise ConfigError(f"activations {self.activations!r} is not valid: use 'tensor' (one range per call), "
                              "'token' (one range per token), 'row' (a symmetric range per token, ONNX-exact) or "
                              "'auto' (chosen per layer from calibration)")

    @property
    def needs_calibration(self) -> bool:
        return self.smooth_alpha is not None or self.activations == "auto"


@register_pass("rtn", RTNConfig, (nn.Linear, nn.Embedding, nn.Conv2d))
def rtn(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    partners = tied_partners(model, [t.name for t in targets])
    done: set[str] = set()
    for t in targets:
        if t.name in done:  # a tied partner of a layer already quantised: it holds that encoding
            continue
        q: WeightQuant = t.config.quant
        try:
            enc = quantize_weight(t.module.weight.data, q.scheme, q.search)
        except ConfigError as exc:
            raise ConfigError(f"layer {t.name!r}: {exc}") from None
        done.update(install_tied(model, t.name, enc, t.config.kernel, partners[t.name]))
        tied = f", tied to {', '.join(partners[t.name])} (one encoding)" if partners[t.name] else ""
        context.log.append(f"{t.name}: {q.scheme.describe()} ({q.search.value}){tied}")


@register_pass("dynamic_int8", DynamicInt8Config, (nn.Linear,))
def dynamic_int8(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    measured = [t for t in targets if t.config.needs_calibration]
    stats = measure_inputs(model, measured, context) if measured else {}
    inverses = smooth(model, [t for t in targets if t.config.smooth_alpha is not None], stats)
    for t in targets:
        cfg: DynamicInt8Config = t.config
        max_code = 63 if cfg.weight_bits == 7 else None
        enc = quantize_weight(t.module.weight.data, cfg.quant.scheme, cfg.quant.search, max_code)
        enc = with_input_scale(enc, inverses.get(t.name))
        kernel, why = activation_kernel(cfg.activations, stats.get(t.name))
        install(model, t.name, enc, kernel)
        note = "" if cfg.smooth_alpha is None else f", smoothed (alpha {cfg.smooth_alpha:g})"
        note += ", a range per token" if kernel is Kernel.DYNAMIC_INT8_TOKEN else ""
        context.log.append(f"{t.name}: W8A8 dynamic, weights int{cfg.weight_bits} {cfg.quant.scheme.describe()}"
                           f"{note}{why}")


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
