"""The default encoding: the tensor itself, in its float dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelpress.encodings.base import Encoding, check_shape, register_encoding, require_array
from modelpress.errors import FormatError

__all__ = ["DenseTensor"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@register_encoding
@dataclass(frozen=True, eq=False)
class DenseTensor(Encoding):
    """An uncompressed float tensor (fp32, fp16 or bf16)."""

    kind = "dense"
    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.values.to(dtype)

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape)}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "DenseTensor":
        shape = check_shape(meta, cls.kind)
        values = require_array(arrays, "values", cls.kind)
        if tuple(values.shape) != shape or values.dtype not in FLOAT_DTYPES:
            raise FormatError(
                f"dense array has shape {tuple(values.shape)} {values.dtype}, metadata says {shape}; "
                "the file is corrupt, re-save the model"
            )
        return cls(values)
