"""Choosing quantisation ranges that minimise each group's reconstruction error.

Min-max ranges waste levels on rare outliers. `mse_params` searches, per group, a shrink factor
of the min-max range on a grid (keeping the one with least squared error), then refines scale
and zero by alternating least squares: with codes fixed, the best (s, m) in w ~ s*c + m is a
closed-form 1-D regression; with (s, m) fixed the best codes are round-to-nearest. Each step
can only lower a group's error, and the best parameters seen are kept per group.

`fit_ranges` is the one way every pass fits ranges (RTN, GPTQ's groups, SparseGPT's kept values,
QAT's starting step sizes): min-max or this search, as `RangeSearch` says; `quantize_weight`
quantises a weight with them.
"""

from __future__ import annotations

from enum import Enum

import torch

from modelpress.encodings.quantized import (
    PARAM_DTYPE,
    PER_TENSOR,
    QuantizedTensor,
    QuantScheme,
    grouped,
    minmax_params,
    quantize,
    quantize_with_params,
)
from modelpress.encodings.views import as_matrix

__all__ = ["RangeSearch", "fit_ranges", "group_errors", "mse_params", "quantize_weight"]


class RangeSearch(str, Enum):
    MINMAX = "minmax"  # each group's full range
    MSE = "mse"  # clipping search + least-squares refinement of each group's scale and zero


def group_errors(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Sum of squared reconstruction errors per group: (R, G, gs) -> (R, G, 1)."""
    codes = quantize_with_params(wg, scale, zero, scheme)
    return ((codes - zero) * scale - wg).pow(2).sum(-1, keepdim=True)


def _round_params(scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme):
    """Parameters as they will be stored (float16), so the search optimises what is written."""
    scale = scale.clamp_min(2**-24).to(PARAM_DTYPE).float().clamp_min(2**-24)
    if scheme.symmetric:
        return scale, torch.full_like(scale, float(scheme.midpoint))
    return scale, zero.clamp(scheme.qmin, scheme.qmax).to(PARAM_DTYPE).float()


def _least_squares_step(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme):
    """With codes fixed, the (scale, zero) minimising ||w - (c - z) s||^2 per group."""
    c = quantize_with_params(wg, scale, zero, scheme)
    if scheme.symmetric:  # w ~ s * (c - mid): regression through the origin
        q = c - scheme.midpoint
        denom = q.pow(2).sum(-1, keepdim=True)
        new_scale = torch.where(denom > 0, (q * wg).sum(-1, keepdim=True) / denom.clamp_min(1e-12), scale)
        return _round_params(new_scale, zero, scheme)
    c_mean, w_mean = c.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
    var = (c - c_mean).pow(2).sum(-1, keepdim=True)
    cov = ((c - c_mean) * (wg - w_mean)).sum(-1, keepdim=True)
    new_scale = torch.where(var > 0, cov / var.clamp_min(1e-12), scale)
    new_scale = torch.where(new_scale > 0, new_scale, scale)
    offset = w_mean - new_scale * c_mean  # w ~ s*c + offset, so zero = -offset / s
    return _round_params(new_scale, -offset / new_scale, scheme)


def mse_params(
    w: torch.Tensor, scheme: QuantScheme, grid: int = 20, min_shrink: float = 0.5, refine_steps: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero), each (R, G, 1), minimising squared error; never worse than min-max."""
    wg = grouped(as_matrix(w.detach().float()), scheme)
    best_scale, best_zero = minmax_params(wg, scheme)
    best_err = group_errors(wg, best_scale, best_zero, scheme)
    for shrink in torch.linspace(1.0, min_shrink, grid)[1:].tolist():
        scale, zero = minmax_params(wg, scheme, shrink)
        err = group_errors(wg, scale, zero, scheme)
        better = err < best_err
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    scale, zero = best_scale, best_zero
    for _ in range(refine_steps):
        scale, zero = _least_squares_step(wg, scale, zero, scheme)
        err = group_errors(wg, scale, zero, scheme)
        better = err < best_err
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    if scheme.group_size == PER_TENSOR:
        return best_scale.reshape(1, 1, 1), best_zero.reshape(1, 1, 1)
    return best_scale, best_zero


def fit_ranges(w: torch.Tensor, scheme: QuantScheme, search: RangeSearch) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (R, G, 1) and float16-representable, for `w` viewed as a matrix: each
    group's full range (min-max) or the error-minimising search."""
    if search is RangeSearch.MSE:
        return mse_params(w, scheme)
    return minmax_params(grouped(as_matrix(w.float()), scheme), scheme)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, search: RangeSearch,
                    max_code: int | None = None) -> QuantizedTensor:
    """Quantise one weight with ranges from `search`.

    `max_code` narrows a symmetric range (e.g. 7-bit values in int8 codes, for fbgemm's W8A8 kernel).
    """
    scale = zero = None
    if search is RangeSearch.MSE or max_code is not None:
        scale, zero = fit_ranges(w, scheme, search)
    if max_code is not None:  # e.g. |q| <= 63 inside int8: widen the scale, keeping the chosen clipping
        scale = scale * ((scheme.midpoint - 1) / max_code)
    return quantize(w, scheme, scale, zero)
