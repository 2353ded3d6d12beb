"""Modules that run encoded weights: drop-in replacements for nn.Linear and nn.Embedding.

A module holds its weight as an `Encoding` (the compressed truth that is saved) and prepares a
kernel lazily on first use, so building or loading a model is cheap and the kernel is chosen on
the machine that runs it. A CompressedLinear with kernel AUTO chooses twice, for 1-row inputs
(decode) and for many rows (prefill); where both choices agree they share one prepared kernel.
`weight` still answers (decoded) for code that reads it directly.
Both register with `nn.registry` (how they are built from the layer they replace, and saved).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import Encoding, QuantizedTensor
from modelpress.encodings.quantized import PER_TENSOR
from modelpress.errors import ConfigError, FormatError
from modelpress.nn.kernels import Kernel, Prepared, prepare, select_kernel, supports
from modelpress.nn.registry import KEEP, register_compressed, source_bias

__all__ = ["CompressedLinear", "CompressedEmbedding", "EmbeddingKernel", "PREFILL_ROWS"]

PREFILL_ROWS = 64  # the row count AUTO chooses a many-row (prefill) kernel for


@register_compressed("linear", replaces=nn.Linear)
class CompressedLinear(nn.Module):
    """y = x W^T + b with W held as an encoding and run by the chosen (or fastest measured) kernel."""

    def __init__(self, weight: Encoding, bias: torch.Tensor | None = None, kernel: Kernel | str = Kernel.AUTO):
        super().__init__()
        if len(weight.shape) != 2:
            raise ConfigError(f"a linear weight must be 2-D, got shape {weight.shape}")
        try:
            kernel = Kernel(kernel)
        except ValueError:
            raise ConfigError(f"unknown kernel {kernel!r}: use one of {[k.value for k in Kernel]}") from None
        if kernel is not Kernel.AUTO and not supports(kernel, weight):
            raise ConfigError(f"kernel {kernel.value!r} cannot run {weight.meta()}: use kernel 'auto'")
        self.out_features, self.in_features = weight.shape
        self.encoding = weight
        self.kernel = kernel
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._runs: dict[bool, Prepared] = {}  # by "one row?": the prepared kernel for decode / for prefill
        self._chosen: dict[bool, Kernel] = {}
        self.resolved_kernel: Kernel | None = None  # the kernel last prepared (by a call or by prepare())

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: Encoding, kernel: Kernel | str = Kernel.AUTO) -> "CompressedLinear":
        return cls(weight, None if linear.bias is None else linear.bias.data, kernel)

    @classmethod
    def build(cls, source: nn.Module, weight: Encoding, kernel: Kernel | str | None = None,
              bias=KEEP) -> "CompressedLinear":
        """The twin of a Linear-like `source`; kernel None keeps a compressed source's where it runs `weight`."""
        if kernel is None:
            keep = isinstance(source, CompressedLinear) and supports(source.kernel, weight)
            kernel = source.kernel if keep else Kernel.AUTO
        return cls(weight, source_bias(source, bias), kernel)

    def manifest_fields(self) -> dict:
        return {"kernel": self.kernel.value}

    @classmethod
    def from_manifest(cls, name: str, entry: dict, weight: Encoding, current: nn.Module) -> "CompressedLinear":
        has_bias = getattr(current, "bias", None) is not None
        bias = torch.zeros(weight.shape[0]) if has_bias else None  # the values come from the state dict
        return cls(weight, bias, Kernel(entry.get("kernel", "auto")))

    def prepare(self, rows: int = 1) -> Kernel:
        """Resolve AUTO for `rows`-row inputs (nn/kernels.py) and build the kernel; returns the kernel used."""
        one = rows == 1
        if one not in self._runs:
            rows = 1 if one else PREFILL_ROWS
            chosen = select_kernel(self.encoding, rows=rows) if self.kernel is Kernel.AUTO else self.kernel
            other = self._chosen.get(not one)
            self._runs[one] = self._runs[not one] if other is chosen else \
                prepare(chosen, self.encoding, None if self.bias is None else self.bias.data)
            self._chosen[one] = chosen
        self.resolved_kernel = self._chosen[one]
        return self.resolved_kernel

    def release(self) -> None:
        """Drop the prepared kernels (and any decoded copy); the next call prepares again."""
        self._runs, self._chosen, self.resolved_kernel = {}, {}, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._runs.get(x.numel() == self.in_features)
        if run is None:
            self.prepare(x.numel() // max(self.in_features, 1))
            run = self._runs[x.numel() == self.in_features]
        return run(x)

    @property
    def weight(self) -> torch.Tensor:
        return self.encoding.decode(torch.float32)

    def extra_repr(self) -> str:
        kernel = self.resolved_kernel.value if self.resolved_kernel else self.kernel.value
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"encoding={self.encoding.describe()}, kernel={kernel}")


class EmbeddingKernel(str, Enum):
    AUTO = "auto"  # gather-decode for row-quantised tables (saves the float copy), else dense
    DENSE = "dense"  # decode the whole table once
    GATHER = "gather"  # decode only the looked-up rows, every call


@register_compressed("embedding", replaces=nn.Embedding)
class CompressedEmbedding(nn.Module):
    """A lookup table held as an encoding; rows are dequantised on lookup."""

    def __init__(self, weight: Encoding, padding_idx: int | None = None, kernel: EmbeddingKernel | str = "auto"):
        super().__init__()
        if len(weight.shape) != 2:
            raise ConfigError(f"an embedding table must be 2-D, got shape {weight.shape}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.encoding = weight
        self.padding_idx = padding_idx
        try:
            self.kernel = EmbeddingKernel(kernel)
        except ValueError:
            raise ConfigError(f"unknown embedding kernel {kernel!r}: use one of {[k.value for k in EmbeddingKernel]}") from None
        if self.kernel is EmbeddingKernel.GATHER and not hasattr(weight, "decode_rows"):
            raise ConfigError(f"the gather kernel needs a row-decodable encoding, not {weight.kind}: use kernel 'dense'")
        self._table: torch.Tensor | None = None

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, weight: Encoding, kernel: EmbeddingKernel | str = "auto"):
        if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise ConfigError("embeddings with max_norm, sparse or scale_grad_by_freq cannot be compressed: ignore them")
        return cls(weight, emb.padding_idx, kernel)

    @classmethod
    def build(cls, source: nn.Module, weight: Encoding, kernel=None, bias=KEEP) -> "CompressedEmbedding":
        """The twin of an embedding table (float, or compressed: its kernel kept where it can run `weight`).

        `kernel` is a Linear's and is not used: a recipe's kernel does not apply to lookups.
        """
        if bias is not KEEP and bias is not None:
            raise ConfigError("an embedding table has no bias")
        if not isinstance(source, CompressedEmbedding):
            return cls.from_embedding(source, weight)
        keep = source.kernel is not EmbeddingKernel.GATHER or hasattr(weight, "decode_rows")
        return cls(weight, source.padding_idx, source.kernel if keep else EmbeddingKernel.AUTO)

    def manifest_fields(self) -> dict:
        return {"kernel": self.kernel.value, "padding_idx": self.padding_idx}

    @classmethod
    def from_manifest(cls, name: str, entry: dict, weight: Encoding, current: nn.Module) -> "CompressedEmbedding":
        padding_idx = entry.get("padding_idx")
        if padding_idx is not None and (not isinstance(padding_idx, int) or not 0 <= padding_idx < weight.shape[0]):
            raise FormatError(f"module {name!r} has an invalid padding_idx")
        return cls(weight, padding_idx, EmbeddingKernel(entry.get("kernel", "auto")))

    @property
    def resolved_kernel(self) -> EmbeddingKernel:
        if self.kernel is not EmbeddingKernel.AUTO:
            return self.kernel
        row_wise = isinstance(self.encoding, QuantizedTensor) and self.encoding.scheme.group_size != PER_TENSOR
        return EmbeddingKernel.GATHER if row_wise else EmbeddingKernel.DENSE

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.resolved_kernel is EmbeddingKernel.GATHER:
            flat = ids.reshape(-1)
            if flat.numel() and (flat.min() < 0 or flat.max() >= self.num_embeddings):
                raise IndexError(f"embedding index out of range [0, {self.num_embeddings})")
            return self.encoding.decode_rows(flat).reshape(*ids.shape, self.embedding_dim)
        if self._table is None:
            self._table = self.encoding.decode(torch.float32)
        return F.embedding(ids, self._table, self.padding_idx)

    def release(self) -> None:
        self._table = None

    @property
    def weight(self) -> torch.Tensor:
        return self.encoding.decode(torch.float32)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, encoding={self.encoding.describe()}, "
                f"kernel={self.resolved_kernel.value}")
