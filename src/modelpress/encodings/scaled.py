"""Channel-scaled encoding: a weight stored as the encoding of W diag(s), with the per-input-channel
factor 1/s kept beside it.

Activation-aware quantisation (AWQ, SmoothQuant) quantises W diag(s) instead of W, for a positive
per-input-channel scale s, and feeds the layer x diag(1/s); the product is unchanged in exact
arithmetic. Where the op that produces x can absorb 1/s (a LayerNorm whose output feeds nothing
else, a Linear's output rows) the scale is folded there and the weight stays a plain encoding
(`passes/channel_scales.py`). Where nothing can absorb it, the weight carries it:

    W_eff = inner.decode() * input_scale[None, :]      inner: (R, C),  input_scale: (C,) = 1/s

A decode-once kernel therefore runs it at no cost (the factor is applied once, at decode); a
kernel that consumes the inner codes (fbgemm's dynamic int8) multiplies its input by
`input_scale` on every call instead, one elementwise pass over the activation.

Metadata: ``{"kind": "channel_scaled", "shape": [R, C], "inner": <meta>}``; arrays:
``input_scale`` ((C,) float32, finite and positive) and the inner encoding's under ``inner.<part>``.
The inner encoding is dense or quantised, never nested further (which also bounds the depth a
hostile file can ask for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelpress.encodings.base import Encoding, register_encoding, wrapped_parts
from modelpress.encodings.dense import DenseTensor
from modelpress.encodings.quantized import QuantizedTensor
from modelpress.errors import ConfigError, FormatError

__all__ = ["ChannelScaledTensor", "INNER_KINDS"]

INNER_KINDS = (DenseTensor.kind, QuantizedTensor.kind)


@register_encoding
@dataclass(frozen=True, eq=False)
class ChannelScaledTensor(Encoding):
    """W (R, C) = inner (R, C) * input_scale (C,) column by column."""

    kind = "channel_scaled"
    inner: Encoding  # (R, C): the encoding of W diag(s)
    input_scale: torch.Tensor  # (C,) float32: 1/s, what the layer's input is multiplied by

    def __post_init__(self) -> None:
        problem = _problem(self.inner, self.input_scale)
        if problem:
            raise ConfigError(f"cannot build a channel-scaled weight: {problem}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.inner.shape)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.inner.decode(torch.float32) * self.input_scale).to(dtype)  # (R, C) * (C,)

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"input_scale": self.input_scale, **{f"inner.{k}": v for k, v in self.inner.arrays().items()}}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "inner": self.inner.meta()}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "ChannelScaledTensor":
        inner, input_scale = wrapped_parts(cls.kind, meta, arrays, "input_scale", INNER_KINDS, _corrupt)
        problem = _problem(inner, input_scale)
        if problem:
            raise _corrupt(problem)
        return cls(inner=inner, input_scale=input_scale)


def _problem(inner: Encoding, input_scale: torch.Tensor) -> str | None:
    """What is wrong, if anything, with this inner encoding and input scale."""
    if inner.kind not in INNER_KINDS or len(inner.shape) != 2:
        return f"the inner weight must be a 2-D {' or '.join(INNER_KINDS)} encoding, got {inner.kind} {inner.shape}"
    if not isinstance(input_scale, torch.Tensor) or input_scale.dtype != torch.float32 or input_scale.dim() != 1:
        desc = f"{tuple(input_scale.shape)} {input_scale.dtype}" if isinstance(input_scale, torch.Tensor) else "missing"
        return f"input_scale must be a 1-D float32 tensor, got {desc}"
    if input_scale.shape[0] != inner.shape[1]:
        return f"input_scale has {input_scale.shape[0]} entries for {inner.shape[1]} input channels"
    if not (torch.isfinite(input_scale).all() and (input_scale > 0).all()):
        return "input_scale holds a non-finite or non-positive value"
    return None


def _corrupt(what: str) -> FormatError:
    return FormatError(f"channel_scaled encoding {what}; the file is corrupt, re-save the model")
