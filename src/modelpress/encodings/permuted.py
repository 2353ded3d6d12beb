"""Input-permuted encoding: a weight whose columns are stored in another order, with that order beside it.

GPTQ with act order (desc_act) quantises a weight's columns in order of decreasing Hessian diagonal, so
its groups are sets of columns scattered over the input, not runs. Taking the columns in that order
makes every group a run again, which a plain grouped encoding holds:

    W[:, order[j]] = inner[:, j]        inner: (R, C),  order: (C,) a permutation of 0..C-1
    x W^T = x[..., order] inner^T       what a kernel on the inner codes runs (one gather of the input)

Metadata: ``{"kind": "input_permuted", "shape": [R, C], "inner": <meta>}``; arrays: ``order`` ((C,)
int64, a permutation) and the inner encoding's under ``inner.<part>``. The inner encoding is quantised
(never nested further, which also bounds the depth a hostile file can ask for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelpress.encodings.base import Encoding, register_encoding, wrapped_parts
from modelpress.encodings.quantized import QuantizedTensor
from modelpress.errors import ConfigError, FormatError

__all__ = ["InputPermutedTensor"]


@register_encoding
@dataclass(frozen=True, eq=False)
class InputPermutedTensor(Encoding):
    """W (R, C) with W[:, order[j]] = inner[:, j]."""

    kind = "input_permuted"
    inner: Encoding  # (R, C): the columns of W in `order`
    order: torch.Tensor  # (C,) int64: a permutation of 0..C-1

    def __post_init__(self) -> None:
        problem = _problem(self.inner, self.order)
        if problem:
            raise ConfigError(f"cannot build an input-permuted weight: {problem}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.inner.shape)

    def describe(self) -> str:
        return f"{self.inner.describe()} (input permuted)"

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        inner = self.inner.decode(dtype)
        out = torch.empty_like(inner)
        out[:, self.order] = inner
        return out

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"order": self.order, **{f"inner.{k}": v for k, v in self.inner.arrays().items()}}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "inner": self.inner.meta()}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "InputPermutedTensor":
        inner, order = wrapped_parts(cls.kind, meta, arrays, "order", (QuantizedTensor.kind,), _corrupt)
        problem = _problem(inner, order)
        if problem:
            raise _corrupt(problem)
        return cls(inner=inner, order=order)


def _problem(inner: Encoding, order: torch.Tensor) -> str | None:
    """What is wrong, if anything, with this inner encoding and column order."""
    if not isinstance(inner, QuantizedTensor) or len(inner.shape) != 2:
        return f"the inner weight must be a 2-D quantized encoding, got {inner.kind} {inner.shape}"
    if not isinstance(order, torch.Tensor) or order.dtype != torch.int64 or order.dim() != 1:
        desc = f"{tuple(order.shape)} {order.dtype}" if isinstance(order, torch.Tensor) else "missing"
        return f"order must be a 1-D int64 tensor, got {desc}"
    cols = inner.shape[1]
    if order.shape[0] != cols:
        return f"order has {order.shape[0]} entries for {cols} input channels"
    if cols and not torch.equal(torch.sort(order).values, torch.arange(cols)):
        return "order is not a permutation of the input channels"
    return None


def _corrupt(what: str) -> FormatError:
    return FormatError(f"input_permuted encoding {what}; the file is corrupt, re-save the model")
