"""What data-aware passes learn about one layer's input over the calibration tokens (`LayerStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LayerStats", "NonFinite", "real_tokens"]


@dataclass
class LayerStats:
    """What data-aware passes learn about one layer's input x (C channels) over calibration tokens."""

    hessian: torch.Tensor | None  # (C, C) float32: sum over tokens of x x^T (None when not asked)
    abs_sum: torch.Tensor  # (C,) float64: sum over tokens of |x|
    abs_max: torch.Tensor  # (C,) float32: max over tokens of |x|
    tokens: int = 0
    # per token: max |x| over its batch / max |x| over the token, i.e. how much coarser one activation
    # range per call is for that token than a range of its own would be (one (N,) tensor per batch)
    range_ratios: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, channels: int, hessian: bool = True) -> "LayerStats":
        return cls(
            hessian=torch.zeros(channels, channels, dtype=torch.float32) if hessian else None,
            abs_sum=torch.zeros(channels, dtype=torch.float64),
            abs_max=torch.zeros(channels, dtype=torch.float32),
        )

    @property
    def token_range_ratio(self) -> float:
        """Median over tokens of range_ratios: 8 means a typical token loses 3 of its 8 bits to the call's range."""
        return float(torch.cat(self.range_ratios).median()) if self.range_ratios else 1.0

    @property
    def mean_abs(self) -> torch.Tensor:
        """(C,) mean |x| per input channel."""
        return self.abs_sum / max(self.tokens, 1)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens x ((N, C), padding already removed)."""
        x = x.float()
        if not len(x):
            return
        batch_max = torch.linalg.vector_norm(x, float("inf"), dim=0)  # max |x| without an |x| copy
        if not torch.isfinite(batch_max).all():
            raise NonFinite()
        self.abs_max = torch.maximum(self.abs_max, batch_max)
        token_max = torch.maximum(x.amax(1), x.amin(1).neg_())  # (N,) max |x|: two fast reductions, no |x| copy
        self.range_ratios.append(token_max.max() / token_max.clamp_min(torch.finfo(torch.float32).tiny))
        self.abs_sum += torch.linalg.vector_norm(x, 1, dim=0).double()
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)  # (C, C), accumulated in place: no (C, C) temporary
        self.tokens += len(x)


class NonFinite(Exception):
    """Raised inside a hook; the runner turns it into a CalibrationError naming the layer and batch."""


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input (..., C) as (N, C) rows, without padded positions where the mask lines up."""
    if mask is not None and not mask.all():
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask]  # (B, T, C) -> (N, C)
        elif x.dim() == 2 and x.shape[0] == mask.numel() and mask.numel() > 1:
            x = x[mask.reshape(-1)]  # (B*T, C) -> (N, C)
    return x.reshape(-1, x.shape[-1])
