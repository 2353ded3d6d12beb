"""Pruning masks (pure: scores in, bool masks out; ties go to the lower index)."""

from __future__ import annotations

import math

import torch

from modelpress.errors import ConfigError

__all__ = ["global_masks", "keep_largest", "nm_mask", "pruned_count", "topk_mask", "wanda_scores"]


def pruned_count(total: int, sparsity: float) -> int:
    """How many of `total` entries a sparsity removes: the nearest integer (halves round up)."""
    return min(total, math.floor(sparsity * total + 0.5))


def keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(..., n) -> bool mask of the `keep` largest entries along the last dim (stable for ties)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """(R, C) scores -> keep mask removing `sparsity` of each row (per_row) or of the whole matrix."""
    rows, cols = scores.shape
    if per_row:
        return keep_largest(scores, cols - pruned_count(cols, sparsity))
    flat = scores.reshape(-1)
    return keep_largest(flat, flat.numel() - pruned_count(flat.numel(), sparsity)).reshape(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(R, C) scores -> keep mask with the N largest of every M consecutive entries of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"pattern {n}:{m} needs an input width divisible by {m}, got {cols}")
    return keep_largest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One threshold across tensors: keep the largest entries of their concatenation."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = keep_largest(flat, flat.numel() - pruned_count(flat.numel(), sparsity))
    return [k.reshape(s.shape) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]


def wanda_scores(W: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for W (R, C) and the per-input sum of squares over calibration tokens (C,)."""
    return W.abs() * input_sq_sum.clamp_min(0).sqrt().to(W.dtype).unsqueeze(0)  # (R, C)
