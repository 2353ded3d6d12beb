"""BERT-style FFN neurons and attention heads: finding them by structure, ranking them, removing them.

- neuron i of a layer's FFN (``intermediate.dense`` then ``output.dense``) is row i of the first
  Linear (and its bias) and column i of the second;
- head h of an attention (``self.query/key/value`` then ``output.dense``) is rows [h*d, (h+1)*d)
  of query, key and value and those columns of the output Linear; the attention's
  ``num_attention_heads`` and ``all_head_size`` follow.

`least_squares_reader` refits the Linear that reads the kept units (``reconstruct``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelpress.errors import ConfigError
from modelpress.nn.shapes import slice_linear
from modelpress.passes.structured.blocks import Shape, child, plain_linears
from modelpress.passes.structured.config import UnitImportance, unit_norm

__all__ = ["AttentionBlock", "FFNBlock", "RECONSTRUCT_DAMP", "attention_layers", "ffn_importance", "ffn_layers",
           "head_importance", "least_squares_reader", "remove_ffn_neurons", "remove_heads"]


class FFNBlock(metaclass=Shape):
    """A module with ``intermediate.dense`` (up) and ``output.dense`` (down), as BERT's layers."""

    @staticmethod
    def matches(obj: Any) -> bool:
        return isinstance(obj, nn.Module) and all(child(obj, p) is not None for p in ("intermediate.dense",
                                                                                         "output.dense"))


class AttentionBlock(metaclass=Shape):
    """A module with ``self.query/key/value`` and ``output.dense``, as BERT's attention."""

    @staticmethod
    def matches(obj: Any) -> bool:
        return isinstance(obj, nn.Module) and all(
            child(obj, p) is not None for p in ("self.query", "self.key", "self.value", "output.dense"))


def ffn_layers(name: str, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    up, down = plain_linears(name, block, ("intermediate.dense", "output.dense"))
    if down.in_features != up.out_features:
        raise ConfigError(f"cannot structurally prune {name!r}: output.dense reads {down.in_features} features but "
                          f"intermediate.dense makes {up.out_features}")
    return up, down


def ffn_importance(up: nn.Linear, down: nn.Linear, kind: UnitImportance, act: torch.Tensor | None = None):
    """(U,) importance of each neuron: producer norm (row and bias of `up`) x reader norm (column of `down`)."""
    reader = unit_norm(down.weight.detach(), 0, UnitImportance.L2 if act is not None else kind)  # (U,)
    if act is not None:
        return act.to(reader.dtype) * reader
    producer = up.weight.detach()
    if up.bias is not None:
        producer = torch.cat([producer, up.bias.detach()[:, None]], 1)  # (U, C+1)
    return unit_norm(producer, 1, kind) * reader


def remove_ffn_neurons(block: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Keep only neurons `keep` of a BERT-style layer's FFN (in place); returns the kept columns of output.dense."""
    up, down = ffn_layers("block", block)
    block.intermediate.dense = slice_linear(up, rows=keep)
    block.output.dense = slice_linear(down, cols=keep)
    return keep


def attention_layers(name: str, attn: nn.Module) -> tuple[list[nn.Linear], nn.Linear, int]:
    q, k, v, o = plain_linears(name, attn, ("self.query", "self.key", "self.value", "output.dense"))
    heads, size = getattr(attn.self, "num_attention_heads", None), getattr(attn.self, "attention_head_size", None)
    if not isinstance(heads, int) or not isinstance(size, int) or heads * size != q.out_features:
        raise ConfigError(f"cannot prune heads of {name!r}: its self-attention has no consistent num_attention_heads "
                          "and attention_head_size")
    if not (q.out_features == k.out_features == v.out_features == o.in_features):
        raise ConfigError(f"cannot prune heads of {name!r}: query/key/value/output widths differ")
    return [q, k, v], o, size


def head_importance(v: nn.Linear, o: nn.Linear, size: int, kind: UnitImportance, act: torch.Tensor | None = None):
    """(H,) importance of each head: value rows (with bias) x output columns, or activation x output columns."""
    reader = o.weight.detach().t().reshape(-1, size * o.out_features)  # (H, d*out)
    reader_norm = unit_norm(reader, 1, UnitImportance.L2 if act is not None else kind)
    if act is not None:
        return act.reshape(-1, size).sum(1).to(reader_norm.dtype) * reader_norm
    producer = v.weight.detach()
    if v.bias is not None:
        producer = torch.cat([producer, v.bias.detach()[:, None]], 1)
    return unit_norm(producer.reshape(-1, size * producer.shape[1]), 1, kind) * reader_norm


def remove_heads(attn: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Keep only heads `keep` of a BERT-style attention (in place); returns the kept columns of output.dense."""
    (q, k, v), o, size = attention_layers("attention", attn)
    rows = (keep[:, None] * size + torch.arange(size)).reshape(-1)  # (kept * d,)
    attn.self.query, attn.self.key, attn.self.value = (slice_linear(m, rows=rows) for m in (q, k, v))
    attn.output.dense = slice_linear(o, cols=rows)
    attn.self.num_attention_heads = len(keep)
    attn.self.all_head_size = len(keep) * size
    return rows


RECONSTRUCT_DAMP = 0.01  # added to the kept inputs' Hessian diagonal, as a fraction of its mean (measured on MiniLM)


def least_squares_reader(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = RECONSTRUCT_DAMP):
    """The (out, K) weight on inputs `keep` that best replaces W (out, C): min ||X W^T - X_K W_K^T||^2.

    With H = X^T X (C, C): W_K = W H[:, K] (H[K, K] + damp * mean(diag) * I)^-1.
    """
    H = H.double()
    HK = H[keep][:, keep]  # (K, K)
    HK = HK + damp * HK.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=torch.float64)
    rhs = H[keep] @ W.double().t()  # (K, out)
    return torch.linalg.solve(HK, rhs).t().to(W.dtype)  # (out, K)
