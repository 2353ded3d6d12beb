"""AWQ-style activation-aware weight quantisation (Lin et al., 2023): scale salient input channels
up before round-to-nearest, so that the weights multiplying large activations lose less.

For a Linear with input statistics from calibration (mean |x_j| per input channel, H = sum x x^T),
each candidate alpha on a grid in [0, 1) gives the per-input-channel scale

    s = mean|x|^alpha,  normalised so that sqrt(max(s) min(s)) = 1,

the weight W diag(s) is quantised with the error-minimising RTN (`range_search`), and the layer's
output error over the calibration tokens is

    err(alpha) = tr(D H D^T),   D = W - Q(W diag(s)) diag(1/s)    (= ||X W^T - X W_eff^T||^2).

The alpha with the least error is kept. alpha = 0 is s = 1, plain RTN, so AWQ is never worse than
RTN on the calibration data. Layers that share an absorber of 1/s (`channel_scales.find_sites`)
share one scale, searched on the sum of their errors; every other layer gets its own. 1/s is
then folded into the absorber, or kept with the weight as an explicit input multiply, which a
decode-once kernel applies for free at decode time.

Unlike GPTQ, every scale of a block is searched on the float block (its calibration statistics
are measured before anything is changed, and scaling leaves the float model's outputs unchanged),
and the weights are quantised after all scales are placed; the encodings are plain
`QuantizedTensor`s (wrapped in `ChannelScaledTensor` where the layer keeps its multiply).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.calibration import LayerStats, run_blockwise
from modelpress.encodings import QuantizedTensor, QuantScheme, RangeSearch, quantize_weight
from modelpress.errors import ConfigError, UnsupportedError
from modelpress.nn import Kernel, install
from modelpress.passes.base import PassContext, Target, check_untied, register_pass
from modelpress.passes.channel_scales import (Absorber, FoldMode, Site, find_sites, migrate, share_groups,
                                              target_sites, with_input_scale)
from modelpress.passes.config import PassConfig, WeightQuant, enum_value, pass_config
from modelpress.passes.linalg import one_thread
from modelpress.passes.quantize import check_groups, weight_only_kernel

__all__ = ["AWQConfig", "AWQResult", "awq_scale", "awq_search", "fold_awq_scales", "output_error_sum"]

MIN_MEAN = 1e-4  # floor of mean|x| before the power: a never-active channel gets a small, finite scale


@pass_config
class AWQConfig(PassConfig):
    """Weight-only quantisation of Linear layers with activation-aware per-input-channel scales.

    `quant.search` is how each group's range is chosen for W diag(s).
    """

    quant: WeightQuant = WeightQuant(bits=4, symmetric=False, group_size=64, search=RangeSearch.MSE)
    grid: int = 20  # alphas searched: 0, 1/grid, ..., (grid - 1)/grid
    fold: FoldMode = FoldMode.AUTO  # auto: the architecture's producer map; explicit: every layer multiplies
    kernel: Kernel = Kernel.AUTO

    def validate(self) -> None:
        object.__setattr__(self, "fold", enum_value(FoldMode, self.fold, "fold"))
        object.__setattr__(self, "kernel", weight_only_kernel(self.kernel, "AWQ"))
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or not 1 <= self.grid <= 1000:
            raise ConfigError(f"grid {self.grid!r} is not valid: use a number of alphas between 1 and 1000 (e.g. 20)")


# ---------------------------------------------------------------------------------------------
# The algorithm (pure: tensors in, tensors out)


@dataclass(frozen=True)
class AWQResult:
    scale: torch.Tensor  # (C,) the chosen s
    alpha: float
    error: float  # sum over the layers of tr(D H D^T) at the chosen alpha
    unscaled_error: float  # the same at alpha = 0 (plain RTN)
    encodings: list[QuantizedTensor] = field(default_factory=list)  # each layer's Q(W diag(s))


def awq_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha (C,), normalised to sqrt(max s * min s) = 1."""
    s = mean_abs.double().clamp_min(MIN_MEAN).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).float()


def output_error_sum(weights: list[torch.Tensor], effective: list[torch.Tensor], H: torch.Tensor) -> float:
    """sum over layers of tr(D H D^T), D = W - W_eff: the squared output error over the calibration tokens."""
    total = 0.0
    for W, W_eff in zip(weights, effective):
        D = (W - W_eff).to(H.dtype)  # (R, C)
        total += float(((D @ H) * D).sum(dtype=torch.float64))
    return total


def awq_search(
    weights: list[torch.Tensor], H: torch.Tensor, mean_abs: torch.Tensor, scheme: QuantScheme,
    search: RangeSearch = RangeSearch.MSE, grid: int = 20,
) -> AWQResult:
    """The scale s = awq_scale(mean_abs, alpha), alpha in {0, 1/grid, ...}, least output error for all `weights`.

    weights: the (R_i, C) layers that share one input and one scale; H (C, C) = sum x x^T.
    """
    best: AWQResult | None = None
    unscaled = float("nan")
    for i in range(grid):
        alpha = i / grid
        s = awq_scale(mean_abs, alpha)
        encodings = [quantize_weight(W * s, scheme, search) for W in weights]  # Q(W diag(s))
        error = output_error_sum(weights, [e.decode(torch.float32) / s for e in encodings], H)
        if i == 0:
            unscaled = error
        if best is None or error < best.error:
            best = AWQResult(s, alpha, error, unscaled, encodings)
    return AWQResult(best.scale, best.alpha, best.error, unscaled, best.encodings)


# ---------------------------------------------------------------------------------------------
# The pass (module surgery)


@register_pass("awq", AWQConfig, (nn.Linear,))
def awq(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    check_groups(targets)
    check_untied(model, targets, "awq")
    sites = target_sites(model, targets)
    searcher = _Searcher(model, sites, context.log)
    # Scaling leaves the float model's outputs unchanged, so every statistic is measured on the
    # float model (sequential=False) and nothing changes until all scales are known.
    run_blockwise(model, targets, context.calibration, searcher, context.log, pass_name="awq", sequential=False)
    inverses = searcher.place()
    for t in targets:
        q: WeightQuant = t.config.quant
        with one_thread():
            encoding = quantize_weight(model.get_submodule(t.name).weight.detach().float(), q.scheme, q.search)
        install(model, t.name, with_input_scale(encoding, inverses.get(t.name)), t.config.kernel)


def fold_awq_scales(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    """AWQ scales for the targets (configs with `quant` and `awq_grid`, e.g. GPTQ's) folded into their
    producers, weights left in float for the pass that quantises them next.

    Only layers whose scale an op absorbs are scaled (a layer keeping an explicit multiply would need
    its encoding wrapped, which the next pass does not do); the rest are left as they are, and logged.
    """
    try:
        sites = find_sites(model, [t.name for t in targets], FoldMode.AUTO)
    except UnsupportedError as exc:
        context.log.append(f"awq scales: none ({exc})")
        return
    folded = [Target(t.name, t.module, AWQConfig(quant=t.config.quant, grid=t.config.awq_grid)) for t in targets
              if sites[t.name].absorber is not Absorber.EXPLICIT]
    for t in targets:
        if sites[t.name].absorber is Absorber.EXPLICIT:
            context.log.append(f"{t.name}: no awq scale ({sites[t.name].why})")
    if folded:
        searcher = _Searcher(model, {t.name: sites[t.name] for t in folded}, context.log)
        run_blockwise(model, folded, context.calibration, searcher, context.log, pass_name="awq scales",
                      sequential=False)
        searcher.place()


@dataclass
class _Searcher:
    """Searches the scales of each calibration group as it comes; places them all at the end."""

    model: nn.Module
    sites: dict[str, Site]
    log: list[str]
    found: list[tuple[list[str], torch.Tensor]] = field(default_factory=list)

    def __call__(self, group: list[tuple[Target, LayerStats]]) -> None:
        by_name = {t.name: (t, stats) for t, stats in group}
        for names in share_groups(list(by_name), self.sites):
            cfg = _one_config([by_name[n][0] for n in names])
            stats = by_name[names[0]][1]
            weights = [self.model.get_submodule(n).weight.detach().float() for n in names]
            with one_thread():  # thousands of mid-sized ops: see linalg.one_thread
                result = awq_search(weights, stats.hessian, stats.mean_abs, cfg.quant.scheme, cfg.quant.search,
                                    cfg.grid)
            self.found.append((names, result.scale))
            total = output_error_sum(weights, [torch.zeros_like(W) for W in weights], stats.hessian)
            site = self.sites[names[0]]
            where = f"into {site.producer}" if site.producer else "as an input multiply"
            self.log.append(
                f"{', '.join(names)}: {cfg.quant.scheme.describe()} awq (alpha {result.alpha:.2f}, scale {where}; "
                f"{stats.tokens} tokens, relative output error {result.error / max(total, 1e-30):.2e}, "
                f"{result.unscaled_error / max(total, 1e-30):.2e} unscaled)"
            )

    def place(self) -> dict[str, torch.Tensor]:
        """Fold every scale into its absorber (or keep it explicit); returns the explicit 1/s per layer."""
        inverses = {}
        for names, s in self.found:
            inverse = migrate(self.model, names, self.sites[names[0]], s)
            if inverse is not None:
                inverses.update(dict.fromkeys(names, inverse))
        return inverses


def _one_config(targets: list[Target]) -> AWQConfig:
    """The config of layers that share one scale; they must agree on it."""
    configs = {t.config for t in targets}
    if len(configs) > 1:
        names = ", ".join(t.name for t in targets)
        raise ConfigError(f"layers {names} share one channel scale but have different awq configs: "
                          "give them the same config, or use fold: explicit")
    return configs.pop()
