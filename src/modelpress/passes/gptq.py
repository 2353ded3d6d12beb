"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantise a Linear weight column by column, each time spreading the
rounding error over the columns not yet quantised so that the layer's output on calibration data
moves as little as possible.

For a layer y = x W^T with calibration inputs X (N, C), the objective is

    min over W_q  || X W^T - X W_q^T ||^2  =  tr((W - W_q) H (W - W_q)^T),   H = 2 X^T X / N.

Quantising column j to q_j leaves the error e = (w_j - q_j) / U_jj, and the optimal change of the
remaining columns is W[:, j+1:] -= e U[j, j+1:], where U is the upper Cholesky factor of H^-1
(so that row j of U is the inverse Hessian restricted to columns j.. already with columns < j
eliminated). Columns are processed in blocks: inside a block each column gets the updates of the
block's earlier columns when it is reached, the rest of the matrix gets them in one matrix
product per block ("lazy batch updates"); the result is the same as the plain column loop.

Group parameters (scale, zero) are chosen when a group's first column is reached, from the
current error-updated weights, by min-max or by the same error-minimising search as RTN
(`range_search.mse_params`). With `act_order`, columns are visited by decreasing H_jj (most
activated inputs first) but every group's parameters are fixed beforehand in the original column
order ("static groups"), so the result is a plain `QuantizedTensor` with no column permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.calibration import LayerStats, run_blockwise
from modelpress.encodings import (PER_CHANNEL, PER_TENSOR, QuantizedTensor, QuantScheme, RangeSearch, fit_ranges,
                                  quantize)
from modelpress.encodings.quantized import quantize_with_params
from modelpress.errors import ConfigError
from modelpress.nn import Kernel
from modelpress.passes.base import PassContext, Target, install_tied, register_pass, tied_partners
from modelpress.passes.config import PassConfig, WeightQuant, pass_config
from modelpress.passes.linalg import inverse_cholesky, one_thread, output_error
from modelpress.passes.quantize import weight_only_kernel

__all__ = ["GPTQConfig", "GPTQResult", "check_groups", "gptq_quantize"]


@pass_config
class GPTQConfig(PassConfig):
    """Weight-only GPTQ quantisation of Linear layers from calibration inputs; activations stay float."""

    quant: WeightQuant = WeightQuant(bits=4, symmetric=False, group_size=64, search=RangeSearch.MSE)
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns per lazy-update block (speed only: the result is the same)
    act_order: bool = False  # visit columns by decreasing H_jj, with static groups
    kernel: Kernel = Kernel.AUTO

    def validate(self) -> None:
        object.__setattr__(self, "kernel", weight_only_kernel(self.kernel, "GPTQ"))
        if self.quant.scheme.group_size == PER_TENSOR:
            raise ConfigError("GPTQ takes group_size 'channel' or a positive integer, not 'tensor'")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp <= 1:
            raise ConfigError(f"damp {self.damp!r} is not valid: use a fraction of the mean Hessian diagonal in [0, 1]")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size {self.block_size!r} is not valid: use a positive integer (e.g. 128)")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"act_order must be true or false, got {self.act_order!r}")


# ---------------------------------------------------------------------------------------------
# The algorithm (pure: tensors in, tensors out)


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # (R, C) uint8
    scale: torch.Tensor  # (R, G, 1), float16-representable
    zero: torch.Tensor  # (R, G, 1), in code units (the midpoint for symmetric schemes)
    weight: torch.Tensor  # (R, C) the quantised weight: (codes - zero) * scale, group by group
    damp: float  # the damping actually used (raised when H + damp I was not positive definite)

    def rows(self, start: int, stop: int) -> "GPTQResult":
        """The result for output rows start..stop (rows are quantised independently given H)."""
        return GPTQResult(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop],
                          self.weight[start:stop], self.damp)

    def encoding(self, scheme: QuantScheme) -> QuantizedTensor:
        """The result as a QuantizedTensor; its codes are exactly `codes` and it decodes to `weight`."""
        return quantize(self.weight, scheme, self.scale, None if scheme.symmetric else self.zero)


class _GroupParams:
    """Scale and zero per (group, row), filled group by group (or all at once, for static groups)."""

    def __init__(self, scheme: QuantScheme, search: RangeSearch, rows: int, groups: int, dtype: torch.dtype):
        self.scheme, self.search = scheme, search
        self.row_scheme = QuantScheme(scheme.bits, scheme.symmetric, PER_CHANNEL)
        self.scale = torch.zeros(groups, rows, dtype=dtype)  # (G, R): one contiguous row per group
        self.zero = torch.zeros(groups, rows, dtype=dtype)

    def fit(self, g: int, w: torch.Tensor) -> None:
        """Parameters of group g from its current weights w (R, gs)."""
        scale, zero = self._params(w, self.row_scheme)  # (R, 1, 1)
        self.scale[g], self.zero[g] = scale.reshape(-1), zero.reshape(-1)

    def fit_all(self, W: torch.Tensor) -> None:
        """Every group's parameters from W (R, C) in its original column order (static groups)."""
        scale, zero = self._params(W, self.scheme)  # (R, G, 1)
        self.scale = scale[..., 0].T.to(self.scale.dtype).contiguous()
        self.zero = zero[..., 0].T.to(self.zero.dtype).contiguous()

    def _params(self, w: torch.Tensor, scheme: QuantScheme):
        return fit_ranges(w, scheme, self.search)

    def as_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each (R, G, 1) as `quantize` takes them."""
        return self.scale.T[..., None].contiguous(), self.zero.T[..., None].contiguous()


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    search: RangeSearch = RangeSearch.MSE,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GPTQResult:
    """Quantise W (R, C) minimising tr((W - W_q) H (W - W_q)^T) for the input Hessian H (C, C).

    H is needed only up to a positive factor (sum x x^T serves as well as 2 X^T X / N). Works in
    W's dtype (float32 in the pass; float64 gives tighter comparisons in tests). Columns of W are
    held as rows of W^T internally, so that each step reads and writes contiguous memory.
    """
    R, C = W.shape
    gs = scheme.group_columns(R, C)
    W, H = W.clone(), H.to(W.dtype, copy=True)
    dead = H.diagonal() == 0  # inputs that are always zero: any value works, choose 0
    H[dead, dead] = 1.0
    W[:, dead] = 0
    params = _GroupParams(scheme, search, R, C // gs, W.dtype)
    order = torch.arange(C)
    if act_order:
        params.fit_all(W)
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, order], H[order[:, None], order]
    group_of = (order // gs).tolist()  # group of each (visited) column
    U, damp = inverse_cholesky(H, damp)  # (C, C) upper
    del H
    d = U.diagonal().tolist()

    Wt = W.T.contiguous()  # (C, R): row j is column j
    Qt = torch.empty_like(Wt)  # quantised columns
    codes = torch.empty_like(Wt)  # their integer codes (as floats)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        E1 = torch.zeros(i2 - i1, R, dtype=W.dtype)  # scaled errors of the block's columns
        for k in range(i2 - i1):
            j = i1 + k
            if not act_order and j % gs == 0:
                params.fit(j // gs, _current(Wt, U, E1, i1, j, min(j + gs, C)).T.contiguous())
            g = group_of[j]
            scale, zero = params.scale[g], params.zero[g]  # (R,)
            w = _current(Wt, U, E1, i1, j, j + 1)[0]  # column j with the block's earlier errors spread
            codes[j] = quantize_with_params(w, scale, zero, scheme)
            torch.mul(codes[j] - zero, scale, out=Qt[j])
            torch.div(w - Qt[j], d[j], out=E1[k])
        Wt[i2:] -= U[i1:i2, i2:].T @ E1  # spread the block's errors over every column after it
    if act_order:
        inverse = torch.argsort(order)
        Qt, codes = Qt[inverse], codes[inverse]
    scale, zero = params.as_rows()
    return GPTQResult(codes=codes.T.to(torch.uint8), scale=scale, zero=zero, weight=Qt.T.contiguous(), damp=damp)


def _current(Wt: torch.Tensor, U: torch.Tensor, E1: torch.Tensor, i1: int, j: int, end: int) -> torch.Tensor:
    """Columns j..end as rows (end - j, R), updated with the errors of the block's columns i1..j.

    Wt already holds the updates of earlier blocks; those of this block are applied on demand.
    Reading one column with a (k, R) product instead of updating every later column of the block
    after each step (a rank-1 update) is the same arithmetic with one small product per column,
    which stays fast when the CPU is shared.
    """
    if j == i1:
        return Wt[j:end]
    return Wt[j:end] - U[i1:j, j:end].T @ E1[:j - i1]


# ---------------------------------------------------------------------------------------------
# The pass (module surgery)


def check_groups(targets: list[Target]) -> None:
    """Fail on a group size that does not divide a layer's input width, before any calibration work."""
    for t in targets:
        try:
            t.config.quant.scheme.group_columns(t.module.out_features, t.module.in_features)
        except ConfigError as exc:
            raise ConfigError(f"layer {t.name!r}: {exc}") from None


@register_pass("gptq", GPTQConfig, (nn.Linear,))
def gptq(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    check_groups(targets)
    layers = _Quantiser(context.log, tied_partners(model, [t.name for t in targets]))
    try:
        run_blockwise(model, targets, context.calibration, layers, context.log, pass_name="gptq")
    finally:  # also when calibration fails part-way: a quantised layer never passes for a float one
        layers.swap_in(model)


@dataclass
class _Quantiser:
    """Quantises each group of layers calibration hands over; swaps the compressed modules in at the end."""

    log: list[str]
    partners: dict[str, list[str]]  # tied weights, found before any weight is rebound
    done: list[tuple[Target, QuantizedTensor]] = field(default_factory=list)

    def __call__(self, group: list[tuple[Target, LayerStats]]) -> None:
        # Layers that read one input (q, k, v) share H; with the same config their rows are
        # quantised in one call, which gives each row the same result as separate calls.
        by_config: dict[GPTQConfig, list[tuple[Target, LayerStats]]] = {}
        for target, stats in group:
            by_config.setdefault(target.config, []).append((target, stats))
        with one_thread():
            for cfg, layers in by_config.items():
                self.quantise(cfg, [t for t, _ in layers], layers[0][1])

    def quantise(self, cfg: GPTQConfig, targets: list[Target], stats: LayerStats) -> None:
        H = stats.hessian  # (C, C) sum of x x^T: GPTQ needs H only up to a factor
        W = torch.cat([t.module.weight.detach().float() for t in targets])  # (sum R, C)
        result = gptq_quantize(W, H, cfg.quant.scheme, cfg.quant.search, cfg.damp, cfg.block_size, cfg.act_order)
        start = 0
        for target in targets:
            stop = start + target.module.out_features
            self.apply(target, cfg, result.rows(start, stop), H, stats.tokens)
            start = stop

    def apply(self, target: Target, cfg: GPTQConfig, result: GPTQResult, H: torch.Tensor, tokens: int) -> None:
        layer = target.module
        encoding = result.encoding(cfg.quant.scheme)
        error = output_error(layer.weight.detach().float(), result.weight, H)
        # Later layers are calibrated on this layer's quantised output. The weight is rebound,
        # not overwritten, so a tensor tied to it elsewhere (an embedding) keeps its values.
        layer.weight = nn.Parameter(encoding.decode(layer.weight.dtype), requires_grad=False)
        self.done.append((target, encoding))
        notes = [cfg.quant.search.value] + (["act_order"] if cfg.act_order else [])
        if result.damp != cfg.damp:
            notes.append(f"damp raised to {result.damp:g}")
        self.log.append(f"{target.name}: {cfg.quant.scheme.describe()} gptq ({', '.join(notes)}; {tokens} tokens, "
                        f"relative output error {error:.2e})")

    def swap_in(self, model: nn.Module) -> None:
        for target, encoding in self.done:
            install_tied(model, target.name, encoding, target.config.kernel, self.partners[target.name])
