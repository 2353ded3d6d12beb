"""Size accounting: bytes and bits per weight of every layer, as stored."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from modelpress.nn import is_compressed

__all__ = ["LayerSize", "SizeReport", "size_report", "folder_bytes"]


@dataclass(frozen=True)
class LayerSize:
    name: str
    encoding: str  # "float32", "int4 asym g32", ...
    shape: tuple[int, ...]
    params: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / max(self.params, 1)


@dataclass(frozen=True)
class SizeReport:
    layers: tuple[LayerSize, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / max(self.params, 1)


def size_report(model: nn.Module) -> SizeReport:
    """One row per weight tensor: encoded weights at their encoded size, everything else as stored.

    A tensor or encoding that several modules share (tied embeddings: `lm_head` and the embedding
    table) is one row, under the first name that reaches it, since it is stored and held once.
    """
    rows: list[LayerSize] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if is_compressed(module) and id(module.encoding) not in seen:  # every compressed module type (nn.registry)
            enc = module.encoding
            seen.add(id(enc))
            rows.append(LayerSize(f"{name}.weight", enc.describe(), tuple(enc.shape), enc.numel, enc.nbytes))
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if pname in module._non_persistent_buffers_set or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            rows.append(LayerSize(full, str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape),
                                  math.prod(tensor.shape), tensor.numel() * tensor.element_size()))
    return SizeReport(tuple(rows))


def folder_bytes(path: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the weight files in a model folder (what a deployment ships besides the tokenizer)."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())
