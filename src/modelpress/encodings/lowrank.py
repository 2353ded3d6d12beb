"""Low-rank encoding: a weight stored as the product of two thin factors, each itself an encoding.

A weight of shape (R, ...) is viewed as the matrix (R, C), C = prod(...), as quantisation views
it (`encodings.views.as_matrix`); a conv weight (R, Cin, kh, kw) keeps its 4-D shape and the
factorisation is of its (R, Cin*kh*kw) matrix. The matrix is

    W ~= left @ right,    left (R, r),  right (r, C)

with `r` the rank. Each factor is a 2-D `DenseTensor` or `QuantizedTensor` (quantised factors
give "low rank + 4-bit" in one encoding; a quantised factor is grouped along its rows: the r
components of an output row for `left`, the C inputs of a component for `right`). Other kinds
are refused as factors, which also bounds the nesting depth a hostile file can ask for.

Metadata: ``{"kind": "lowrank", "shape": [...], "rank": r, "left": <meta>, "right": <meta>}``;
the factors' arrays are written under ``left.<part>`` and ``right.<part>``. Storing the factors
costs r (R + C) values instead of R C, and running them costs the same fraction of the
multiply-adds (`factored_is_cheaper`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelpress.encodings.base import Encoding, check_shape, encoding_from_parts, register_encoding, sub_arrays
from modelpress.encodings.dense import DenseTensor
from modelpress.encodings.quantized import QuantizedTensor
from modelpress.encodings.views import matrix_dims
from modelpress.errors import ConfigError, FormatError

__all__ = ["LowRankTensor", "FACTOR_KINDS", "factored_is_cheaper"]

FACTOR_KINDS = (DenseTensor.kind, QuantizedTensor.kind)  # what a factor may be (no nesting of factors)
_FACTORS = ("left", "right")


def factored_is_cheaper(rank: int, rows: int, cols: int) -> bool:
    """Whether r (R + C) < R C: the factors hold fewer values, and take fewer multiply-adds, than W."""
    return rank * (rows + cols) < rows * cols


@register_encoding
@dataclass(frozen=True, eq=False)
class LowRankTensor(Encoding):
    """W (R, C) = left (R, r) @ right (r, C), each factor dense or quantised."""

    kind = "lowrank"
    left: Encoding  # (R, r)
    right: Encoding  # (r, C)
    tensor_shape: tuple[int, ...]  # the weight's shape; its matrix view is (R, C)

    def __post_init__(self) -> None:
        left = tuple(self.left.shape)
        problem = _mismatch(left, tuple(self.right.shape), tuple(self.tensor_shape), left[1] if len(left) == 2 else 0)
        if problem:
            raise ConfigError(f"cannot build a low-rank weight: it {problem}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor_shape

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def factored_is_cheaper(self) -> bool:
        return factored_is_cheaper(self.rank, *self.matrix_shape)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (R, r), right (r, C)), decoded."""
        return self.left.decode(dtype), self.right.decode(dtype)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        left, right = self.factors(torch.float32)
        return (left @ right).reshape(self.tensor_shape).to(dtype)  # (R, C) -> the weight's shape

    def arrays(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name in _FACTORS for k, v in getattr(self, name).arrays().items()}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.tensor_shape), "rank": self.rank,
                "left": self.left.meta(), "right": self.right.meta()}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "LowRankTensor":
        shape = check_shape(meta, cls.kind)
        rank = meta.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise _corrupt(f"has an invalid rank {rank!r}")
        extra = sorted(k for k in arrays if not k.startswith(("left.", "right.")))
        if extra:
            raise _corrupt(f"carries unexpected arrays {extra}")
        left, right = (_read_factor(meta, arrays, name) for name in _FACTORS)
        problem = _mismatch(tuple(left.shape), tuple(right.shape), shape, rank)
        if problem:
            raise _corrupt(problem)
        return cls(left=left, right=right, tensor_shape=shape)


def _mismatch(left: tuple[int, ...], right: tuple[int, ...], shape: tuple[int, ...], rank: int) -> str | None:
    """What is wrong, if anything, with factors left and right for a rank-`rank` weight of `shape`."""
    if len(shape) < 2:
        return f"has shape {list(shape)}: a low-rank weight has at least 2 dimensions"
    rows, cols = matrix_dims(shape)
    if rank < 1 or left != (rows, rank) or right != (rank, cols):
        return (f"has factors {left} @ {right}; a rank-{rank} weight of shape {list(shape)} "
                f"needs ({rows}, {rank}) @ ({rank}, {cols}) with rank >= 1")
    return None


def _read_factor(meta: dict[str, Any], arrays: dict[str, torch.Tensor], name: str) -> Encoding:
    factor_meta = meta.get(name)
    if not isinstance(factor_meta, dict) or factor_meta.get("kind") not in FACTOR_KINDS:
        kind = factor_meta.get("kind") if isinstance(factor_meta, dict) else None
        raise _corrupt(f"has a {name} factor of kind {kind!r}; factors are {list(FACTOR_KINDS)}")
    return encoding_from_parts(factor_meta, sub_arrays(arrays, name))


def _corrupt(what: str) -> FormatError:
    return FormatError(f"lowrank encoding {what}; the file is corrupt, re-save the model")
