"""The structured pruning passes (module surgery): prune_ffn, prune_heads, prune_channels."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelpress.calibration import run_blockwise
from modelpress.errors import ConfigError
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.structured.bert import (AttentionBlock, FFNBlock, attention_layers, ffn_importance, ffn_layers,
                                               head_importance, least_squares_reader, remove_ffn_neurons, remove_heads)
from modelpress.passes.structured.channels import (channel_activations, channel_plan, conv_importance,
                                                   remove_conv_channels, trace)
from modelpress.passes.structured.config import (GQAMode, PruneChannelsConfig, PruneFFNConfig, PruneHeadsConfig,
                                                 UnitImportance, keep_units)
from modelpress.passes.structured.decoder import (GatedFFNBlock, GroupedAttentionBlock, gated_ffn_importance,
                                                  gated_ffn_layers, gqa_head_importance, gqa_keep, gqa_layers,
                                                  remove_gated_neurons, remove_gqa_heads, sync_config)

__all__ = ["prune_channels", "prune_ffn", "prune_heads"]


def _calibrate(model: nn.Module, targets: list[Target], context: PassContext, reader_path, name: str,
               process) -> None:
    """Calibration statistics of each target's reader Linear, handed to `process(target, stats)` block by block."""
    by_reader = {f"{t.name}.{reader_path(t)}": t for t in targets}
    pseudo = [Target(r, model.get_submodule(r), t.config) for r, t in by_reader.items()]

    def on_group(group) -> None:
        for reader, stats in group:
            process(by_reader[reader.name], stats)

    hessian = any(t.config.reconstruct for t in targets)
    run_blockwise(model, pseudo, context.calibration, on_group, context.log, pass_name=name, hessian=hessian)


def _run_structured(model, targets, context, name: str, reader_path, importance, remove, unit, keep=None) -> None:
    """Rank, keep and remove each target's units. `reader_path(t)`: the path of the Linear that reads them in the
    target; `keep(t, scores)`: the kept units (default: `keep_units`); `unit(t)`: what a unit is called."""
    keep = keep or (lambda t, scores: keep_units(scores, t.config.ratio, t.config.multiple_of))
    for t in targets:
        importance(t, None)  # validates the structure before any calibration work

    def process(t: Target, stats) -> None:
        act = stats.mean_abs.float() if stats is not None and t.config.importance is UnitImportance.ACTIVATION else None
        scores = importance(t, act)
        kept = keep(t, scores)
        reader = f"{t.name}.{reader_path(t)}"
        W = model.get_submodule(reader).weight.detach().clone()
        cols = remove(t, kept)
        note = ""
        if t.config.reconstruct:
            with torch.no_grad():
                model.get_submodule(reader).weight.copy_(least_squares_reader(W, stats.hessian, cols))
            note = ", reader refitted by least squares"
        context.log.append(f"{t.name}: {name} kept {kept.numel()} of {scores.numel()} {unit(t)} "
                           f"({t.config.importance.value} importance{note})")

    calibrated = [t for t in targets if t.config.importance is UnitImportance.ACTIVATION or t.config.reconstruct]
    for t in targets:
        if t not in calibrated:
            process(t, None)
    if calibrated:
        _calibrate(model, calibrated, context, reader_path, name, process)


def _gated(module: nn.Module) -> bool:
    return isinstance(module, GatedFFNBlock)


@register_pass("prune_ffn", PruneFFNConfig, (FFNBlock, GatedFFNBlock))
def prune_ffn(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    """FFN neurons: BERT-style (up rows, down columns) or SwiGLU (gate and up rows, down columns)."""
    def importance(t: Target, act):
        block = model.get_submodule(t.name)
        if _gated(block):
            return gated_ffn_importance(*gated_ffn_layers(t.name, block), t.config.importance, act)
        up, down = ffn_layers(t.name, block)
        return ffn_importance(up, down, t.config.importance, act)

    def remove(t: Target, keep):
        block = model.get_submodule(t.name)
        return remove_gated_neurons(block, keep) if _gated(block) else remove_ffn_neurons(block, keep)

    readers = {t.name: "down_proj" if _gated(t.module) else "output.dense" for t in targets}
    _run_structured(model, targets, context, "prune_ffn", lambda t: readers[t.name], importance, remove,
                    lambda t: "neurons")
    sync_config(model)


@register_pass("prune_heads", PruneHeadsConfig, (AttentionBlock, GroupedAttentionBlock))
def prune_heads(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    """Attention heads: BERT-style, or grouped-query (whole key/value groups, or query heads per group)."""
    grouped = {t.name: isinstance(t.module, GroupedAttentionBlock) for t in targets}
    if any(grouped.values()):
        _check_query_heads(model, [t for t in targets if grouped[t.name]])

    def importance(t: Target, act):
        attn = model.get_submodule(t.name)
        if grouped[t.name]:
            return gqa_head_importance(attn, t.config.gqa, t.config.importance, act)
        (q, k, v), o, size = attention_layers(t.name, attn)
        return head_importance(v, o, size, t.config.importance, act)

    def keep(t: Target, scores):
        if grouped[t.name]:
            return gqa_keep(scores, t.config.gqa, t.config.ratio)
        return keep_units(scores, t.config.ratio, t.config.multiple_of)

    def remove(t: Target, kept):
        attn = model.get_submodule(t.name)
        return remove_gqa_heads(attn, kept, t.config.gqa) if grouped[t.name] else remove_heads(attn, kept)

    def unit(t: Target) -> str:
        return "heads" if not grouped[t.name] else ("key/value groups" if t.config.gqa is GQAMode.GROUPS
                                                    else "query heads")

    readers = {t.name: "o_proj" if grouped[t.name] else "output.dense" for t in targets}
    _run_structured(model, targets, context, "prune_heads", lambda t: readers[t.name], importance, remove, unit, keep)
    sync_config(model)


def _check_query_heads(model: nn.Module, targets: list[Target]) -> None:
    """Refuse, before changing anything, head counts one config cannot describe: removing query heads changes
    the heads per key/value group, which every layer reads from the config (every grouped-query attention
    must lose the same number), and the config's query heads (the widest layer's) must divide hidden_size."""
    by_name = {t.name: t for t in targets}
    after: set[int] = set()
    heads: dict[int, tuple[Any, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, GroupedAttentionBlock):
            continue
        _, _, _, kv = gqa_layers(name, module)
        g, t = module.num_key_value_groups, by_name.get(name)
        if t is not None and t.config.gqa is GQAMode.QUERIES:
            g = len(keep_units(torch.zeros(g), t.config.ratio))
        elif t is not None:
            kv = len(keep_units(torch.zeros(kv), t.config.ratio))
        after.add(g)
        config = getattr(module, "config", None)
        heads[id(config)] = (config, max(heads.get(id(config), (None, 0))[1], kv * g))
    if len(after) > 1:
        raise ConfigError(f"gqa: queries would leave {sorted(after)} query heads per key/value head in different "
                          "layers, which one config cannot describe: prune every attention layer with one ratio, "
                          "or use gqa: groups")
    for config, count in heads.values():
        hidden = getattr(config, "hidden_size", None)
        if isinstance(hidden, int) and hidden % count:
            raise ConfigError(f"prune_heads would leave {count} query heads, which do not divide hidden_size {hidden} "
                              "(the model's config requires it): choose a ratio that keeps a divisor")


@register_pass("prune_channels", PruneChannelsConfig, (nn.Conv2d,))
def prune_channels(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    for t in targets:
        if t.config.reconstruct:
            raise ConfigError(f"layer {t.name!r}: reconstruct refits Linear readers of FFN neurons and heads; "
                              "channel pruning does not support it, drop reconstruct")
    graph = trace(model)
    plans = {t.name: channel_plan(model, graph, t.name) for t in targets}  # refuse before changing anything
    for t in targets:
        act = None
        if t.config.importance is UnitImportance.ACTIVATION:
            act = channel_activations(model, plans[t.name], context.calibration)
        scores = conv_importance(model, plans[t.name], t.config.importance, act)
        keep = keep_units(scores, t.config.ratio, t.config.multiple_of)
        remove_conv_channels(model, plans[t.name], keep)
        context.log.append(f"{t.name}: prune_channels kept {len(keep)} of {len(scores)} channels "
                           f"({t.config.importance.value} importance)")
