"""Llama-family decoders: SwiGLU neurons and grouped-query attention heads, found by structure, ranked, removed.

- neuron i of a SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``: down(act(gate x) * up x))
  is row i of gate and of up (and their biases) and column i of down; the MLP's
  ``intermediate_size`` follows.
- heads of a grouped-query attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, with
  ``head_dim`` and ``num_key_value_groups`` G): key/value head j serves query heads jG..(j+1)G-1.
  `GQAMode.GROUPS` removes whole groups (the key/value head, its G query heads, their columns of
  o_proj): G stays as it is. `GQAMode.QUERIES` removes the same number of query heads from every
  group (rows of q, columns of o), keeping every key/value head: G shrinks.

The model's config follows (`intermediate_size`, `num_attention_heads`, `num_key_value_heads`,
`head_dim` made explicit), so that a skeleton built from it, then shrunk to each layer's recorded
Linear widths (`nn/shapes.py`), rebuilds the pruned model: the config holds the widest layer,
since a load may only shrink. Removing query heads changes G, which every layer reads from the
config when it is built: that mode must leave every decoder layer with the same G.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelpress.errors import ConfigError
from modelpress.nn.shapes import slice_linear
from modelpress.passes.structured.blocks import Shape, child, plain_linears
from modelpress.passes.structured.config import GQAMode, UnitImportance, keep_units, unit_norm

__all__ = ["GQAMode", "GatedFFNBlock", "GroupedAttentionBlock", "gated_ffn_importance", "gated_ffn_layers",
           "gqa_head_importance", "gqa_keep", "gqa_layers", "remove_gated_neurons", "remove_gqa_heads",
           "sync_config"]


class GatedFFNBlock(metaclass=Shape):
    """A module with ``gate_proj``, ``up_proj`` and ``down_proj`` (a SwiGLU MLP: Llama, Mistral, Qwen2)."""

    @staticmethod
    def matches(obj: Any) -> bool:
        return isinstance(obj, nn.Module) and all(child(obj, p) is not None
                                                  for p in ("gate_proj", "up_proj", "down_proj"))


class GroupedAttentionBlock(metaclass=Shape):
    """A module with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``head_dim`` and ``num_key_value_groups``."""

    @staticmethod
    def matches(obj: Any) -> bool:
        return (isinstance(obj, nn.Module) and all(child(obj, p) is not None
                                                   for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
                and isinstance(getattr(obj, "head_dim", None), int)
                and isinstance(getattr(obj, "num_key_value_groups", None), int))


# ---------------------------------------------------------------------------------------------- SwiGLU neurons


def gated_ffn_layers(name: str, block: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    gate, up, down = plain_linears(name, block, ("gate_proj", "up_proj", "down_proj"))
    if not gate.out_features == up.out_features == down.in_features:
        raise ConfigError(f"cannot structurally prune {name!r}: gate_proj makes {gate.out_features} features, "
                          f"up_proj {up.out_features}, and down_proj reads {down.in_features}")
    return gate, up, down


def _rows_with_bias(linear: nn.Linear) -> torch.Tensor:
    w = linear.weight.detach()
    return w if linear.bias is None else torch.cat([w, linear.bias.detach()[:, None]], 1)


def gated_ffn_importance(gate: nn.Linear, up: nn.Linear, down: nn.Linear, kind: UnitImportance,
                         act: torch.Tensor | None = None) -> torch.Tensor:
    """(U,) importance of each neuron: |gate row| |up row| |down column|, or mean |act(gate) up| |down column|."""
    reader = unit_norm(down.weight.detach(), 0, UnitImportance.L2 if act is not None else kind)  # (U,)
    if act is not None:
        return act.to(reader.dtype) * reader
    return unit_norm(_rows_with_bias(gate), 1, kind) * unit_norm(_rows_with_bias(up), 1, kind) * reader


def remove_gated_neurons(block: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Keep only neurons `keep` of a SwiGLU MLP (in place); returns the kept columns of down_proj."""
    gate, up, down = gated_ffn_layers("mlp", block)
    block.gate_proj, block.up_proj = slice_linear(gate, rows=keep), slice_linear(up, rows=keep)
    block.down_proj = slice_linear(down, cols=keep)
    if isinstance(getattr(block, "intermediate_size", None), int):
        block.intermediate_size = len(keep)
    return keep


# ---------------------------------------------------------------------------------------------- GQA heads


def gqa_layers(name: str, attn: nn.Module) -> tuple[list[nn.Linear], nn.Linear, int, int]:
    """([q, k, v], o, head_dim d, key/value heads), checked for a consistent grouped-query layout."""
    q, k, v, o = plain_linears(name, attn, ("q_proj", "k_proj", "v_proj", "o_proj"))
    d, g = attn.head_dim, attn.num_key_value_groups
    kv = k.out_features // d if d > 0 else 0
    if (d < 1 or g < 1 or kv < 1 or k.out_features != kv * d or v.out_features != kv * d
            or q.out_features != kv * g * d or o.in_features != q.out_features):
        raise ConfigError(f"cannot prune heads of {name!r}: q/k/v/o widths ({q.out_features}, {k.out_features}, "
                          f"{v.out_features}, {o.in_features}) do not fit head_dim {d} with {g} query heads per "
                          "key/value head")
    return [q, k, v], o, d, kv


def gqa_head_importance(attn: nn.Module, mode: GQAMode, kind: UnitImportance, act: torch.Tensor | None = None):
    """Importance of each unit `mode` removes: (kv,) groups or (kv, G) query heads.

    The reader is o_proj's columns of the unit; the producer the unit's value rows (groups) or query
    rows (query heads), or, with calibration, the unit's mean |input of o_proj| summed over its columns.
    """
    (q, k, v), o, d, kv = gqa_layers("attention", attn)
    g = attn.num_key_value_groups
    rkind = UnitImportance.L2 if act is not None else kind
    cols = o.weight.detach().t().reshape(kv, g, d * o.out_features)  # (kv, G, d*out)
    if mode is GQAMode.GROUPS:
        reader = unit_norm(cols.reshape(kv, -1), 1, rkind)  # (kv,)
        if act is not None:
            return act.reshape(kv, -1).sum(1).to(reader.dtype) * reader
        producer = _rows_with_bias(v).reshape(kv, -1)
        return unit_norm(producer, 1, kind) * reader
    reader = unit_norm(cols, 2, rkind)  # (kv, G)
    if act is not None:
        return act.reshape(kv, g, d).sum(2).to(reader.dtype) * reader
    producer = _rows_with_bias(q).reshape(kv, g, -1)
    return unit_norm(producer, 2, kind) * reader


def gqa_keep(scores: torch.Tensor, mode: GQAMode, ratio: float) -> torch.Tensor:
    """Kept unit indices: groups (ascending), or query heads as (kv, G') per group (each ascending)."""
    if mode is GQAMode.GROUPS:
        return keep_units(scores, ratio)
    return torch.stack([keep_units(row, ratio) for row in scores])  # (kv, G'): the same count per group


def remove_gqa_heads(attn: nn.Module, keep: torch.Tensor, mode: GQAMode) -> torch.Tensor:
    """Keep only the units `keep` (`gqa_keep`'s) of a grouped-query attention (in place); returns o's kept columns."""
    (q, k, v), o, d, kv = gqa_layers("attention", attn)
    g = attn.num_key_value_groups
    dims = torch.arange(d)
    if mode is GQAMode.GROUPS:
        kv_rows = (keep[:, None] * d + dims).reshape(-1)
        heads = (keep[:, None] * g + torch.arange(g)).reshape(-1)  # the groups' query heads
        attn.k_proj, attn.v_proj = slice_linear(k, rows=kv_rows), slice_linear(v, rows=kv_rows)
    else:
        heads = (torch.arange(kv)[:, None] * g + keep).reshape(-1)
        attn.num_key_value_groups = keep.shape[1]
    q_rows = (heads[:, None] * d + dims).reshape(-1)
    attn.q_proj, attn.o_proj = slice_linear(q, rows=q_rows), slice_linear(o, cols=q_rows)
    return q_rows


def sync_config(model: nn.Module) -> None:
    """Write the widest decoder layer's widths into every config the layers share, so that a skeleton built
    from it can be shrunk to each layer's recorded widths; refuse layers whose query heads per key/value
    head differ (each layer reads that number from the config when it is built)."""
    for config in {id(c): c for c in _configs(model)}.values():
        mlps = [m for m in model.modules() if isinstance(m, GatedFFNBlock) and getattr(m, "config", None) is config]
        attns = [m for m in model.modules()
                 if isinstance(m, GroupedAttentionBlock) and getattr(m, "config", None) is config]
        if mlps and hasattr(config, "intermediate_size"):
            config.intermediate_size = max(m.down_proj.in_features for m in mlps)
        if attns:
            groups = {a.num_key_value_groups for a in attns}
            if len(groups) > 1:
                raise ConfigError(f"pruned attentions would keep {sorted(groups)} query heads per key/value head in "
                                  "different layers, which one config cannot describe: prune query heads of every "
                                  "layer alike, or use gqa: groups")
            kv = max(a.k_proj.out_features // a.head_dim for a in attns)
            config.head_dim = attns[0].head_dim
            config.num_key_value_heads = kv
            config.num_attention_heads = kv * groups.pop()


def _configs(model: nn.Module) -> list[Any]:
    return [m.config for m in model.modules()
            if isinstance(m, (GatedFFNBlock, GroupedAttentionBlock)) and getattr(m, "config", None) is not None]
