"""SparseGPT (Frantar & Alistarh, 2023), pure: prune (and quantise) a weight with inverse-Hessian compensation.

For a layer y = x W^T with calibration Hessian H = sum x x^T, choose the mask and update the kept
weights to minimise the output error tr((W - W_s) H (W - W_s)^T), column by column with GPTQ's
machinery: U is the upper Cholesky factor of H^-1, a column's error (w - q) / U_jj is spread over
the columns not yet processed, within each block at once and then block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.encodings import PER_CHANNEL, QuantScheme, RangeSearch, fit_ranges, quantize
from modelpress.encodings.quantized import quantize_with_params
from modelpress.encodings.sparse import SparseTensor, sparsify
from modelpress.errors import ConfigError
from modelpress.passes.linalg import inverse_cholesky
from modelpress.passes.prune.masks import keep_largest, nm_mask, pruned_count

__all__ = ["SparseGPTResult", "check_kept_groups", "kept_per_row", "sparsegpt_prune"]



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
    R, C = W.shape
    check_kept_groups(C, sparsity, nm, scheme, block_size)
    W, H = W.clone(), H.double().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: prune them first, at no cost
    H[dead, dead] = 1.0
    W[:, dead] = 0
    U, damp = inverse_cholesky(H, damp)
    U = U.to(W.dtype)  # (C, C) upper
    pruned, mask = _obs_sweep(W, U, block_size, _MaskChooser(sparsity, nm))
    if scheme is None:
        return SparseGPTResult(pruned, mask, None, None, damp)
    kept = pruned[mask].reshape(R, -1)  # (R, K): every row keeps K
    scale, zero = fit_ranges(kept, scheme, search)  # (R, G, 1)
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
            mask[:, i1:i1 + W1.shape[1]] = keep_largest(saliency, _block_keep(W1.shape[1], self.sparsity))
        elif self.nm is not None and k % self.nm[1] == 0:
            m = self.nm[1]
            mask[:, i1 + k:i1 + k + m] = nm_mask(W1[:, k:k + m].pow(2) / d[k:k + m].pow(2), *self.nm)


class _FixedMask:
    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def choose(self, W1: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, i1: int, k: int) -> None:
        if k == 0:
            mask[:, i1:i1 + W1.shape[1]] = self.mask[:, i1:i1 + W1.shape[1]]


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
