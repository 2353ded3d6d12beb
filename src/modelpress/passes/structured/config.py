"""What structured pruning is configured by, and how units are ranked and chosen (pure)."""

from __future__ import annotations

from enum import Enum

import torch

from modelpress.errors import ConfigError
from modelpress.passes.config import PassConfig, enum_value, pass_config
from modelpress.passes.prune.masks import pruned_count

__all__ = ["GQAMode", "PruneChannelsConfig", "PruneFFNConfig", "PruneHeadsConfig", "StructuredConfig", "UnitImportance",
           "keep_units", "unit_norm"]


class UnitImportance(str, Enum):
    L1 = "l1"  # |producer|_1 * |reader|_1
    L2 = "l2"  # |producer|_2 * |reader|_2
    ACTIVATION = "activation"  # mean |activation| on calibration data * |reader|_2


class GQAMode(str, Enum):
    """Which heads of a grouped-query attention (G query heads per key/value head) prune_heads removes."""

    GROUPS = "groups"  # whole key/value heads with their G query heads (G unchanged)
    QUERIES = "queries"  # the same number of query heads from every group, every key/value head kept (G shrinks)


@pass_config
class StructuredConfig(PassConfig):
    """Remove `ratio` of the units (neurons, heads or channels) of each selected layer."""

    ratio: float = 0.3
    importance: UnitImportance = UnitImportance.L2
    reconstruct: bool = False  # refit the reading Linear to the kept units by least squares (calibration)
    # round the kept count down to a multiple of this (CPU matmul kernels run widths that are
    # multiples of 8 or 16 faster than odd ones), so at least `ratio` is removed
    multiple_of: int = 1

    def validate(self) -> None:
        object.__setattr__(self, "importance", enum_value(UnitImportance, self.importance, "importance"))
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio {self.ratio!r} is not valid: give the fraction of units to remove, in [0, 1)")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ConfigError(f"multiple_of {self.multiple_of!r} is not valid: give a positive integer, e.g. 16")
        if not isinstance(self.reconstruct, bool):
            raise ConfigError(f"reconstruct must be true or false, got {self.reconstruct!r}")


@pass_config
class PruneFFNConfig(StructuredConfig):
    """`prune_ffn`: remove FFN neurons of BERT-style layers, or of SwiGLU MLPs (gate/up rows, down columns)."""


@pass_config
class PruneHeadsConfig(StructuredConfig):
    """`prune_heads`: remove attention heads of BERT-style attentions, or of grouped-query attentions
    (Llama family) as `gqa` says: whole key/value groups, or query heads evenly from every group."""

    gqa: GQAMode = GQAMode.GROUPS

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "gqa", enum_value(GQAMode, self.gqa, "gqa"))


@pass_config
class PruneChannelsConfig(StructuredConfig):
    """`prune_channels`: remove output channels of plain Conv2d layers."""


def keep_units(importance: torch.Tensor, ratio: float, multiple_of: int = 1) -> torch.Tensor:
    """Indices (ascending) of the units kept: all but the `ratio` least important, at least one.

    With `multiple_of`, the kept count is rounded down to a multiple of it (never below one multiple).
    """
    n = importance.numel()
    keep = max(1, n - pruned_count(n, ratio))
    if multiple_of > 1 and keep >= multiple_of:
        keep -= keep % multiple_of
    order = torch.sort(importance, descending=True, stable=True).indices[:keep]
    return order.sort().values


def unit_norm(x: torch.Tensor, dim: int, kind: UnitImportance) -> torch.Tensor:
    return x.abs().sum(dim) if kind is UnitImportance.L1 else x.pow(2).sum(dim).sqrt()
