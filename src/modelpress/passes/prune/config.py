"""What every pruning pass is configured by: how much, in which pattern, and how kept values are stored."""

from __future__ import annotations

from enum import Enum

from modelpress.encodings import PER_TENSOR, QuantScheme, RangeSearch
from modelpress.encodings.sparse import SparseLayout, nm_pattern
from modelpress.errors import ConfigError
from modelpress.nn import Kernel
from modelpress.passes.config import PassConfig, WeightQuant, enum_value, pass_config

__all__ = ["MagnitudeConfig", "SPARSE_KERNELS", "Scope", "SparseGPTConfig", "SparsityConfig", "WandaConfig",
           "check_fraction", "parse_pattern"]

SPARSE_KERNELS = (Kernel.AUTO, Kernel.DENSE, Kernel.DECODE_PER_CALL, Kernel.SPARSE_CSR)


class Scope(str, Enum):
    LAYER = "layer"  # one threshold per weight
    ROW = "row"  # the same fraction of every output row
    GLOBAL = "global"  # one threshold across every selected layer of the same sparsity


def check_fraction(value, name: str) -> float:
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


@pass_config
class SparsityConfig(PassConfig):
    """What every pruning pass shares: how much, in which pattern, and how kept values are stored.

    `quant` quantises the kept values (bits None keeps them float32), per row or in groups of kept
    values along a row.
    """

    sparsity: float | None = None  # fraction of weights removed; implied by an N:M pattern
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4"
    quant: WeightQuant = WeightQuant(bits=None, symmetric=False, group_size="channel", search=RangeSearch.MSE)
    kernel: Kernel = Kernel.AUTO
    # how positions are stored: "auto" picks the fewest raw bytes; "bitmask" is the one to pick when
    # the checkpoint is entropy-coded (a coded bitmask costs about the entropy of the positions)
    layout: str = "auto"

    def validate(self) -> None:
        if self.layout != "auto" and self.layout not in {m.value for m in SparseLayout}:
            raise ConfigError(f"layout {self.layout!r} is not valid: use 'auto' or one of "
                              f"{[m.value for m in SparseLayout]}")
        object.__setattr__(self, "kernel", enum_value(Kernel, self.kernel, "kernel"))
        if self.kernel not in SPARSE_KERNELS:
            raise ConfigError(f"kernel {self.kernel.value!r} cannot run a sparse weight: use one of "
                              f"{[k.value for k in SPARSE_KERNELS]}")
        nm = parse_pattern(self.pattern)
        if nm is None and self.sparsity is None:
            raise ConfigError("unstructured pruning needs a sparsity: give a fraction in [0, 1), e.g. sparsity: 0.5")
        if self.sparsity is not None:
            check_fraction(self.sparsity, "sparsity")
        if nm is not None and self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                              f"({1 - nm[0] / nm[1]:.0%} pruned): drop sparsity or change the pattern")
        if self.scheme is not None and self.scheme.group_size == PER_TENSOR:
            raise ConfigError("kept values are quantised per row or in groups: use group_size 'channel' or an integer")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm is not None else float(self.sparsity)

    @property
    def scheme(self) -> QuantScheme | None:
        """How kept values are quantised (None: kept float32)."""
        return self.quant.scheme

    @property
    def positions(self) -> str | None:
        """The SparseLayout to store positions in, or None to pick the fewest raw bytes."""
        return None if self.layout == "auto" else self.layout

    def describe(self) -> str:
        what = self.pattern if self.nm else f"{self.target_sparsity:.0%} unstructured"
        return what + ("" if self.scheme is None else f", kept values {self.scheme.describe()}")


@pass_config
class MagnitudeConfig(SparsityConfig):
    """Keep the largest |W| (per layer, per output row, or across all selected layers)."""

    scope: Scope = Scope.LAYER

    def validate(self) -> None:
        object.__setattr__(self, "scope", enum_value(Scope, self.scope, "scope"))
        super().validate()
        if self.nm is not None and self.scope is Scope.GLOBAL:
            raise ConfigError(f"pattern {self.pattern} keeps N of every M in each row: it has no global scope, "
                              "use scope 'layer'")
        if self.scheme is not None and self.nm is None and self.scope is not Scope.ROW:
            raise ConfigError("quantising kept values needs the same count kept in every row: use scope 'row' "
                              "or an N:M pattern")


@pass_config
class WandaConfig(SparsityConfig):
    """Keep the largest |W_ij| * ||X_j||_2 in each output row (needs calibration data)."""


@pass_config
class SparseGPTConfig(SparsityConfig):
    """Prune (and optionally quantise) with inverse-Hessian error compensation (needs calibration data)."""

    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns per mask-selection and lazy-update block

    def validate(self) -> None:
        super().validate()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp <= 1:
            raise ConfigError(f"damp {self.damp!r} is not valid: use a fraction of the mean Hessian diagonal in [0, 1]")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size {self.block_size!r} is not valid: use a positive integer (e.g. 128)")
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ConfigError(f"block_size {self.block_size} is not a multiple of M={nm[1]} of pattern {self.pattern}")
