"""Unstructured and N:M pruning: magnitude, Wanda, SparseGPT, and gradual pruning during training.

Every pass removes a fraction of each selected layer's weights and stores the rest as a
`SparseTensor` (kept values + positions), so the pruned model is smaller on disk and in the
checkpoint, not just full of zeros. A layer's weight is viewed as the matrix (R, C): rows are
output channels, columns are inputs (flattened in*kh*kw for convolutions).

- `magnitude`: keep the largest |W|, per layer, per output row, or across all selected layers.
- `wanda` (Sun et al., 2023): keep the largest |W_ij| * ||X_j||_2 in each output row, X being the
  layer's calibration inputs (no weight update).
- `sparsegpt` (Frantar & Alistarh, 2023): choose the mask and update the kept weights to
  minimise the output error ||X W^T - X W_s^T||^2, column by column with the inverse-Hessian
  machinery of GPTQ; optionally quantise the kept weights in the same pass (prune + quantise).

The pattern is one parameter: "unstructured" (a `sparsity` fraction) or "N:M" (keep N of every M
consecutive inputs of a row, e.g. 2:4). With `bits`, kept values are quantised (per row or in
groups of kept values), which needs every row to keep the same count: N:M patterns, per-row
magnitude, Wanda and SparseGPT all do.

`GradualPruner` raises sparsity during fine-tuning on the cubic schedule of Zhu & Gupta (2017)
with magnitude, first-order Taylor (|w * dL/dw|) or movement (-w * dL/dw) importance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from modelpress.encodings import DenseTensor, Encoding, QuantScheme, quantize
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR, as_matrix, quantize_with_params
from modelpress.encodings.sparse import SparseLayout, SparseTensor, nm_pattern, sparsify
from modelpress.errors import ConfigError
from modelpress.nn import CompressedConv2d, CompressedLinear, Kernel
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.quantize import RangeSearch, quantize_weight

__all__ = [
    "GradualConfig",
    "GradualPruner",
    "Importance",
    "MagnitudeConfig",
    "Scope",
    "SparseGPTConfig",
    "SparseGPTResult",
    "WandaConfig",
    "cubic_sparsity",
    "global_masks",
    "nm_mask",
    "pruned_count",
    "sparsegpt_prune",
    "topk_mask",
    "wanda_scores",
]

SPARSE_KERNELS = (Kernel.AUTO, Kernel.DENSE, Kernel.DECODE_PER_CALL, Kernel.SPARSE_CSR)


class Scope(str, Enum):
    LAYER = "layer"  # one threshold per weight
    ROW = "row"  # the same fraction of every output row
    GLOBAL = "global"  # one threshold across every selected layer of the same sparsity


# ---------------------------------------------------------------------------------------------
# Configs


def _enum(enum_type: type[Enum], value, name: str):
    try:
        return enum_type(value)
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not valid: use one of {[e.value for e in enum_type]}") from None


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name} {value!r} is not valid: give a fraction in [0, 1), e.g. 0.5")
    return float(value)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M)."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"pattern {pattern!r} is not valid: use 'unstructured' or N:M such as '2:4' or '4:8'")
    return nm_pattern(int(parts[0]), int(parts[1]))


@dataclass(frozen=True)
class SparsityConfig:
    """What every pruning pass shares: how much, in which pattern, and how kept values are stored."""

    sparsity: float | None = None  # fraction of weights removed; implied by an N:M pattern
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4"
    bits: int | None = None  # quantise the kept values to this many bits (None: keep float32)
    symmetric: bool = False
    group_size: int | str = "channel"  # groups of kept values along a row
    search: RangeSearch = RangeSearch.MSE  # how quantisation ranges are chosen
    kernel: Kernel = Kernel.AUTO
    # how positions are stored: "auto" picks the fewest raw bytes; "bitmask" is the one to pick when
    # the checkpoint is entropy-coded (a coded bitmask costs about the entropy of the positions)
    layout: str = "auto"
    version: int = 1

    def __post_init__(self) -> None:
        if self.layout != "auto" and self.layout not in {m.value for m in SparseLayout}:
            raise ConfigError(f"layout {self.layout!r} is not valid: use 'auto' or one of "
                              f"{[m.value for m in SparseLayout]}")
        object.__setattr__(self, "search", _enum(RangeSearch, self.search, "search"))
        object.__setattr__(self, "kernel", _enum(Kernel, self.kernel, "kernel"))
        if self.kernel not in SPARSE_KERNELS:
            raise ConfigError(f"kernel {self.kernel.value!r} cannot run a sparse weight: use one of "
                              f"{[k.value for k in SPARSE_KERNELS]}")
        nm = parse_pattern(self.pattern)
        if nm is None and self.sparsity is None:
            raise ConfigError("unstructured pruning needs a sparsity: give a fraction in [0, 1), e.g. sparsity: 0.5")
        if self.sparsity is not None:
            _check_fraction(self.sparsity, "sparsity")
        if nm is not None and self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                              f"({1 - nm[0] / nm[1]:.0%} pruned): drop sparsity or change the pattern")
        if self.bits is not None:
            self.scheme  # validates bits, symmetry and group size
            if self.scheme.group_size == PER_TENSOR:
                raise ConfigError("kept values are quantised per row or in groups: use group_size 'channel' or an integer")
        if self.version != 1:
            raise ConfigError(f"pruning config version {self.version!r} is not supported: this modelpress reads version 1")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm is not None else float(self.sparsity)

    @property
    def scheme(self) -> QuantScheme | None:
        return None if self.bits is None else QuantScheme(self.bits, self.symmetric, self.group_size)

    def describe(self) -> str:
        what = self.pattern if self.nm else f"{self.target_sparsity:.0%} unstructured"
        return what + ("" if self.scheme is None else f", kept values {self.scheme.describe()}")


@dataclass(frozen=True)
class MagnitudeConfig(SparsityConfig):
    """Keep the largest |W| (per layer, per output row, or across all selected layers)."""

    scope: Scope = Scope.LAYER

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", _enum(Scope, self.scope, "scope"))
        super().__post_init__()
        if self.nm is not None and self.scope is Scope.GLOBAL:
            raise ConfigError(f"pattern {self.pattern} keeps N of every M in each row: it has no global scope, "
                              "use scope 'layer'")
        if self.bits is not None and self.nm is None and self.scope is not Scope.ROW:
            raise ConfigError("quantising kept values needs the same count kept in every row: use scope 'row' "
                              "or an N:M pattern")


@dataclass(frozen=True)
class WandaConfig(SparsityConfig):
    """Keep the largest |W_ij| * ||X_j||_2 in each output row (needs calibration data)."""


@dataclass(frozen=True)
class SparseGPTConfig(SparsityConfig):
    """Prune (and optionally quantise) with inverse-Hessian error compensation (needs calibration data)."""

    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns per mask-selection and lazy-update block

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp <= 1:
            raise ConfigError(f"damp {self.damp!r} is not valid: use a fraction of the mean Hessian diagonal in [0, 1]")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size {self.block_size!r} is not valid: use a positive integer (e.g. 128)")
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ConfigError(f"block_size {self.block_size} is not a multiple of M={nm[1]} of pattern {self.pattern}")


# ---------------------------------------------------------------------------------------------
# Masks (pure: scores in, bool masks out; ties go to the lower index)


def pruned_count(total: int, sparsity: float) -> int:
    """How many of `total` entries a sparsity removes: the nearest integer (halves round up)."""
    return min(total, math.floor(sparsity * total + 0.5))


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(..., n) -> bool mask of the `keep` largest entries along the last dim (stable for ties)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """(R, C) scores -> keep mask removing `sparsity` of each row (per_row) or of the whole matrix."""
    rows, cols = scores.shape
    if per_row:
        return _keep_largest(scores, cols - pruned_count(cols, sparsity))
    flat = scores.reshape(-1)
    return _keep_largest(flat, flat.numel() - pruned_count(flat.numel(), sparsity)).reshape(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(R, C) scores -> keep mask with the N largest of every M consecutive entries of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"pattern {n}:{m} needs an input width divisible by {m}, got {cols}")
    return _keep_largest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One threshold across tensors: keep the largest entries of their concatenation."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = _keep_largest(flat, flat.numel() - pruned_count(flat.numel(), sparsity))
    return [k.reshape(s.shape) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]


def wanda_scores(W: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for W (R, C) and the per-input sum of squares over calibration tokens (C,)."""
    return W.abs() * input_sq_sum.clamp_min(0).sqrt().to(W.dtype).unsqueeze(0)  # (R, C)


def layer_mask(scores: torch.Tensor, cfg: SparsityConfig, per_row: bool) -> torch.Tensor:
    nm = cfg.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    return topk_mask(scores, cfg.target_sparsity, per_row)


# ---------------------------------------------------------------------------------------------
# SparseGPT (pure)


@dataclass(frozen=True)
class SparseGPTResult:
    weight: torch.Tensor  # (R, C): pruned (and quantised) weights, exact zeros where mask is False
    mask: torch.Tensor  # (R, C) bool, True = kept
    scale: torch.Tensor | None  # (R, G, 1) per group of kept values, when quantised
    zero: torch.Tensor | None  # (R, G, 1) in code units
    damp: float

    def encoding(self, nm: tuple[int, int] | None, scheme: QuantScheme | None, layout: str | None = None) -> SparseTensor:
        """The result as a SparseTensor; quantised values re-encode exactly to `weight`'s kept entries."""
        if scheme is None:
            return sparsify(self.weight, self.mask, nm=nm, layout=layout)
        zero = None if scheme.symmetric else self.zero
        return sparsify(self.weight, self.mask, nm=nm, layout=layout,
                        encode_values=lambda v: quantize(v, scheme, self.scale, zero))


def _block_keep(width: int, cfg_sparsity: float) -> int:
    return width - pruned_count(width, cfg_sparsity)


def kept_per_row(cols: int, sparsity: float, nm: tuple[int, int] | None, block_size: int) -> list[int]:
    """Kept entries per row in each SparseGPT block (the same for every row)."""
    widths = [min(block_size, cols - i) for i in range(0, cols, block_size)]
    if nm is not None:
        return [w // nm[1] * nm[0] for w in widths]
    return [_block_keep(w, sparsity) for w in widths]


def check_kept_groups(cols: int, sparsity: float, nm, scheme: QuantScheme | None, block_size: int) -> None:
    """Quantisation groups must divide the values each row keeps."""
    if scheme is None or scheme.group_size == PER_CHANNEL:
        return
    kept = sum(kept_per_row(cols, sparsity, nm, block_size))
    if kept % scheme.group_size:
        raise ConfigError(f"group size {scheme.group_size} does not divide the {kept} kept values of each row: "
                          "choose a divisor or group_size 'channel'")


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    scheme: QuantScheme | None = None,
    search: RangeSearch = RangeSearch.MSE,
    damp: float = 0.01,
    block_size: int = 128,
) -> SparseGPTResult:
    """Prune W (R, C) (and quantise its kept values) minimising tr((W - W_s) H (W - W_s)^T).

    Masks are chosen per row: in each block of columns, the entries with the smallest
    w^2 / U_jj^2 (the OBS saliency, U the upper Cholesky factor of H^-1), or the N:M pattern of
    those scores group by group as the columns are reached. Each column's error (w - q) / U_jj is
    spread over the columns not yet processed, as in GPTQ.

    With a quantisation scheme, a first sweep fixes the mask and the compensated kept values; the
    quantisation ranges (per row, or per group of kept values) are fitted to those values, and a
    second sweep from the original W, with that mask and those ranges, quantises column by column
    so that later columns also absorb the rounding errors. Ranges fitted at each group's start
    (as GPTQ does) fall short here: pruning errors move the later weights far outside them.
    """
    from modelpress.passes.gptq import _inverse_cholesky

    R, C = W.shape
    check_kept_groups(C, sparsity, nm, scheme, block_size)
    W, H = W.clone(), H.double().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: prune them first, at no cost
    H[dead, dead] = 1.0
    W[:, dead] = 0
    U, damp = _inverse_cholesky(H, damp)
    U = U.to(W.dtype)  # (C, C) upper
    pruned, mask = _obs_sweep(W, U, block_size, _MaskChooser(sparsity, nm))
    if scheme is None:
        return SparseGPTResult(pruned, mask, None, None, damp)
    kept = pruned[mask].reshape(R, -1)  # (R, K): every row keeps K
    scale, zero = _fit_ranges(kept, scheme, search)  # (R, G, 1)
    quantised, _ = _obs_sweep(W, U, block_size, _FixedMask(mask), _KeptQuantiser(mask, scheme, scale, zero))
    return SparseGPTResult(quantised, mask, scale, zero, damp)


def _obs_sweep(W: torch.Tensor, U: torch.Tensor, block_size: int, masks, quantiser=None):
    """One pass over the columns: choose the mask, replace each column by its kept (quantised) values,
    and spread the error over the columns after it (within the block at once, then block by block)."""
    W = W.clone()
    R, C = W.shape
    Q, mask = torch.zeros_like(W), torch.zeros(R, C, dtype=torch.bool)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # (R, B), (B, B)
        E1 = torch.zeros_like(W1)
        for k in range(i2 - i1):
            masks.choose(W1, U1.diagonal(), mask, i1, k)
            w = W1[:, k]
            q = quantiser.column(w, i1 + k) if quantiser else w
            Q[:, i1 + k] = q = torch.where(mask[:, i1 + k], q, torch.zeros_like(q))
            E1[:, k] = (w - q) / U1[k, k]
            W1[:, k + 1:] -= E1[:, k, None] * U1[k, None, k + 1:]  # spread over the block's later columns
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # ... and, once per block, over every column after it
    return Q, mask


class _MaskChooser:
    """SparseGPT's mask selection: per row by OBS saliency, at each block's start (unstructured) or
    each N:M group's start (on the weights updated so far)."""

    def __init__(self, sparsity: float, nm: tuple[int, int] | None):
        self.sparsity, self.nm = sparsity, nm

    def choose(self, W1: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, i1: int, k: int) -> None:
        if self.nm is None and k == 0:
            saliency = W1.pow(2) / d.pow(2)  # (R, B)
            mask[:, i1:i1 + W1.shape[1]] = _keep_largest(saliency, _block_keep(W1.shape[1], self.sparsity))
        elif self.nm is not None and k % self.nm[1] == 0:
            m = self.nm[1]
            mask[:, i1 + k:i1 + k + m] = nm_mask(W1[:, k:k + m].pow(2) / d[k:k + m].pow(2), *self.nm)


class _FixedMask:
    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def choose(self, W1: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, i1: int, k: int) -> None:
        if k == 0:
            mask[:, i1:i1 + W1.shape[1]] = self.mask[:, i1:i1 + W1.shape[1]]


def _fit_ranges(kept: torch.Tensor, scheme: QuantScheme, search: RangeSearch):
    """(R, G, 1) scale and zero for (R, K) kept values, per row or per group of kept values."""
    from modelpress.encodings.quantized import _grouped, minmax_params
    from modelpress.encodings.range_search import mse_params

    if search is RangeSearch.MSE:
        return mse_params(kept, scheme)
    return minmax_params(_grouped(kept.float(), scheme), scheme)


class _KeptQuantiser:
    """Quantise column j of a row with the range of the group its kept value falls in."""

    def __init__(self, mask: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero: torch.Tensor):
        self.scheme, self.scale, self.zero = scheme, scale, zero
        kept = int(mask[0].sum()) if len(mask) else 0
        gs = kept if scheme.group_size == PER_CHANNEL else scheme.group_size
        rank = (mask.long().cumsum(1) - 1).clamp_min(0)  # (R, C) kept index of each column in its row
        self.group = (rank // max(gs, 1)).clamp_max(scale.shape[1] - 1)  # (R, C)
        self.rows = torch.arange(len(mask))

    def column(self, w: torch.Tensor, j: int) -> torch.Tensor:
        g = self.group[:, j]
        scale, zero = self.scale[self.rows, g, 0].to(w.dtype), self.zero[self.rows, g, 0].to(w.dtype)  # (R,)
        return (quantize_with_params(w, scale, zero, self.scheme) - zero) * scale


# ---------------------------------------------------------------------------------------------
# The passes (module surgery)


def _matrix(module: nn.Module) -> torch.Tensor:
    return as_matrix(module.weight.detach().float())


def _value_encoder(cfg: SparsityConfig, name: str):
    """Kept values -> their encoding: float32, or quantised per row / per group of kept values."""
    scheme = cfg.scheme
    if scheme is None:
        return DenseTensor

    def encode(v: torch.Tensor) -> Encoding:
        if v.dim() != 2:
            raise ConfigError(f"layer {name!r}: quantised kept values need the same count in every row")
        try:
            return quantize_weight(v, scheme, cfg.search)
        except ConfigError as exc:
            raise ConfigError(f"layer {name!r}: {exc} (groups run over the {v.shape[1]} kept values of a row)") from None

    return encode


def _replace(model: nn.Module, target: Target, mask: torch.Tensor) -> SparseTensor:
    """Swap the target for its compressed twin keeping the weights where `mask` (R, C) is true."""
    cfg: SparsityConfig = target.config
    W = target.module.weight.detach().float()
    try:
        enc = sparsify(W, mask.reshape(W.shape), nm=cfg.nm, encode_values=_value_encoder(cfg, target.name),
                       layout=None if cfg.layout == "auto" else cfg.layout)
    except ConfigError as exc:
        raise ConfigError(f"layer {target.name!r}: {exc}") from None
    return _install(model, target, enc)


def _install(model: nn.Module, target: Target, enc: SparseTensor) -> SparseTensor:
    layer = target.module
    try:
        if isinstance(layer, nn.Conv2d):
            new = CompressedConv2d.from_conv(layer, enc)
        else:
            new = CompressedLinear.from_linear(layer, enc, target.config.kernel)
    except ConfigError as exc:
        raise ConfigError(f"layer {target.name!r}: {exc}") from None
    model.set_submodule(target.name, new)
    return enc


def _check_width(target: Target) -> None:
    nm = target.config.nm
    cols = _matrix(target.module).shape[1]
    if nm is not None and cols % nm[1]:
        raise ConfigError(f"layer {target.name!r}: pattern {target.config.pattern} needs an input width divisible by "
                          f"{nm[1]}, got {cols}: exclude the layer or use unstructured sparsity")


def _log(context: PassContext, target: Target, enc: SparseTensor, method: str, extra: str = "") -> None:
    context.log.append(f"{target.name}: {method} {target.config.describe()}, density {enc.density:.3f}, "
                       f"{enc.layout.value} positions, {enc.bits_per_weight:.2f} bits/weight{extra}")


@register_pass("magnitude", MagnitudeConfig, (nn.Linear, nn.Conv2d))
def magnitude(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    for t in targets:
        _check_width(t)
    global_groups: dict[float, list[Target]] = {}
    for t in targets:
        if t.config.scope is Scope.GLOBAL:
            global_groups.setdefault(t.config.target_sparsity, []).append(t)
            continue
        mask = layer_mask(_matrix(t.module).abs(), t.config, per_row=t.config.scope is Scope.ROW)
        _log(context, t, _replace(model, t, mask), "magnitude")
    for sparsity, group in global_groups.items():
        masks = global_masks([_matrix(t.module).abs() for t in group], sparsity)
        for t, mask in zip(group, masks):
            _log(context, t, _replace(model, t, mask), "magnitude (global)")


def _calibrated(model: nn.Module, targets: list[Target], context: PassContext, name: str, process) -> None:
    from modelpress.calibration import run_blockwise

    for t in targets:
        _check_width(t)
    run_blockwise(model, targets, context.calibration, lambda group: [process(t, s) for t, s in group],
                  context.log, pass_name=name)


@register_pass("wanda", WandaConfig, (nn.Linear,))
def wanda(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    def process(t: Target, stats) -> None:
        mask = layer_mask(wanda_scores(_matrix(t.module), stats.hessian.diagonal()), t.config, per_row=True)
        _log(context, t, _replace(model, t, mask), "wanda", f" ({stats.tokens} tokens)")

    _calibrated(model, targets, context, "wanda", process)


@register_pass("sparsegpt", SparseGPTConfig, (nn.Linear,))
def sparsegpt(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    from modelpress.passes.gptq import output_error

    for t in targets:  # fail on groups that do not fit the blocks before spending time on calibration
        _check_sparsegpt_groups(t)

    def process(t: Target, stats) -> None:
        cfg: SparseGPTConfig = t.config
        W = _matrix(t.module)
        H = stats.hessian * (2.0 / max(stats.tokens, 1))  # (C, C)
        result = sparsegpt_prune(W, H, cfg.target_sparsity, cfg.nm, cfg.scheme, cfg.search, cfg.damp, cfg.block_size)
        enc = _install(model, t, result.encoding(cfg.nm, cfg.scheme, None if cfg.layout == "auto" else cfg.layout))
        error = output_error(W, result.weight, H)
        _log(context, t, enc, "sparsegpt", f" ({stats.tokens} tokens, relative output error {error:.2e})")

    _calibrated(model, targets, context, "sparsegpt", process)


def _check_sparsegpt_groups(t: Target) -> None:
    cfg: SparseGPTConfig = t.config
    _check_width(t)
    try:
        check_kept_groups(_matrix(t.module).shape[1], cfg.target_sparsity, cfg.nm, cfg.scheme, cfg.block_size)
    except ConfigError as exc:
        raise ConfigError(f"layer {t.name!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Gradual pruning during training


class Importance(str, Enum):
    MAGNITUDE = "magnitude"  # |w|
    TAYLOR = "taylor"  # running mean of |w * dL/dw| (first-order Taylor estimate of the loss change)
    MOVEMENT = "movement"  # accumulated -w * dL/dw: weights moving away from zero are kept (Sanh et al. 2020)


def cubic_sparsity(step: int, final: float, initial: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3, held outside [t0, t_end]."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


@dataclass(frozen=True)
class GradualConfig:
    """Raise sparsity from `initial_sparsity` to `final_sparsity` between two training steps."""

    final_sparsity: float = 0.9
    end_step: int = 1000  # the step at which the final sparsity is reached
    initial_sparsity: float = 0.0
    start_step: int = 0
    every: int = 10  # recompute masks every this many steps (Zhu & Gupta's delta t)
    importance: Importance = Importance.MAGNITUDE
    scope: Scope = Scope.GLOBAL  # layer or global (row keeps each output row equally sparse)
    taylor_decay: float = 0.9  # running-mean factor of the Taylor scores
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", _enum(Importance, self.importance, "importance"))
        object.__setattr__(self, "scope", _enum(Scope, self.scope, "scope"))
        _check_fraction(self.final_sparsity, "final_sparsity")
        _check_fraction(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError(f"initial_sparsity {self.initial_sparsity} exceeds final_sparsity {self.final_sparsity}")
        for name in ("start_step", "end_step", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "every" else 0):
                raise ConfigError(f"{name} {value!r} is not valid: give a {'positive' if name == 'every' else 'non-negative'} integer")
        if self.end_step <= self.start_step:
            raise ConfigError(f"end_step {self.end_step} must come after start_step {self.start_step}")
        if not 0 <= self.taylor_decay < 1:
            raise ConfigError(f"taylor_decay {self.taylor_decay!r} is not valid: give a fraction in [0, 1)")


class GradualPruner:
    """Masks that tighten on a cubic schedule while the model trains.

        pruner = GradualPruner(model, GradualConfig(final_sparsity=0.9, end_step=steps))
        for step in range(total):
            loss.backward(); pruner.observe(); optimizer.step(); pruner.step(step)
        pruner.finalize()  # Linear/Conv2d -> compressed modules holding SparseTensor weights

    Masks only grow: a pruned weight stays pruned (and zero) for the rest of training.
    """

    def __init__(self, model: nn.Module, config: GradualConfig, names: list[str] | None = None):
        self.model, self.config = model, config
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        if names is not None:
            unknown = sorted(set(names) - set(layers))
            if unknown:
                raise ConfigError(f"cannot prune {unknown}: only Linear and Conv2d layers are pruned gradually")
            layers = {n: layers[n] for n in names}
        if not layers:
            raise ConfigError("the model has no Linear or Conv2d layer to prune")
        self.layers = layers
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
        self.scores = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
        self.sparsity = 0.0

    def observe(self) -> None:
        """After backward: accumulate Taylor / movement scores from the current gradients."""
        c = self.config
        if c.importance is Importance.MAGNITUDE:
            return
        for n, m in self.layers.items():
            if m.weight.grad is None:
                continue
            wg = (m.weight.detach() * m.weight.grad.detach())
            if c.importance is Importance.TAYLOR:
                self.scores[n].mul_(c.taylor_decay).add_(wg.abs(), alpha=1 - c.taylor_decay)
            else:
                self.scores[n].sub_(wg)

    def _importance(self, name: str) -> torch.Tensor:
        m = self.layers[name]
        if self.config.importance is Importance.MAGNITUDE:
            return m.weight.detach().abs()
        return self.scores[name].clone()

    @torch.no_grad()
    def step(self, step: int) -> None:
        """After the optimiser step: tighten the masks when the schedule says so, and apply them."""
        c = self.config
        if step % c.every == 0 or step == c.end_step:
            target = cubic_sparsity(step, c.final_sparsity, c.initial_sparsity, c.start_step, c.end_step)
            if target > self.sparsity:
                self._update_masks(target)
                self.sparsity = target
        for n, m in self.layers.items():
            m.weight.mul_(self.masks[n])

    def _update_masks(self, sparsity: float) -> None:
        # pruned weights score -inf, so they stay pruned (masks only grow)
        scores = {n: torch.where(self.masks[n], self._importance(n), float("-inf")) for n in self.layers}
        if self.config.scope is Scope.GLOBAL:
            kept = global_masks([as_matrix(s) for s in scores.values()], sparsity)
            for n, k in zip(scores, kept):
                self.masks[n] = k.reshape(self.masks[n].shape)
            return
        for n, s in scores.items():
            self.masks[n] = topk_mask(as_matrix(s), sparsity, self.config.scope is Scope.ROW).reshape(s.shape)

    def finalize(self) -> nn.Module:
        """Replace every pruned layer by its compressed twin with a SparseTensor weight."""
        for n, m in self.layers.items():
            enc = sparsify(m.weight.detach().float(), self.masks[n])
            new = CompressedConv2d.from_conv(m, enc) if isinstance(m, nn.Conv2d) else CompressedLinear.from_linear(m, enc)
            self.model.set_submodule(n, new)
        return self.model
