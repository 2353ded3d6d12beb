"""The structured pruning passes (module surgery): prune_ffn, prune_heads, prune_channels."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.calibration import run_blockwise
from modelpress.errors import ConfigError
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.structured.bert import (AttentionBlock, FFNBlock, attention_layers, ffn_importance, ffn_layers,
                                               head_importance, least_squares_reader, remove_ffn_neurons, remove_heads)
from modelpress.passes.structured.channels import (channel_activations, channel_plan, conv_importance,
                                                   remove_conv_channels, trace)
from modelpress.passes.structured.config import (PruneChannelsConfig, PruneFFNConfig, PruneHeadsConfig, UnitImportance,
                                                 keep_units)

__all__ = ["prune_channels", "prune_ffn", "prune_heads"]


def _calibrate(model: nn.Module, targets: list[Target], context: PassContext, reader_path: str, name: str,
               process) -> None:
    """Calibration statistics of each target's reader Linear, handed to `process(target, stats)` block by block."""
    by_reader = {f"{t.name}.{reader_path}": t for t in targets}
    pseudo = [Target(r, model.get_submodule(r), t.config) for r, t in by_reader.items()]

    def on_group(group) -> None:
        for reader, stats in group:
            process(by_reader[reader.name], stats)

    hessian = any(t.config.reconstruct for t in targets)
    run_blockwise(model, pseudo, context.calibration, on_group, context.log, pass_name=name, hessian=hessian)


def _run_structured(model, targets, context, name: str, reader_path: str, importance, remove, unit: str) -> None:
    for t in targets:
        importance(t, None)  # validates the structure before any calibration work

    def process(t: Target, stats) -> None:
        act = stats.mean_abs.float() if stats is not None and t.config.importance is UnitImportance.ACTIVATION else None
        scores = importance(t, act)
        keep = keep_units(scores, t.config.ratio, t.config.multiple_of)
        reader = f"{t.name}.{reader_path}"
        W = model.get_submodule(reader).weight.detach().clone()
        cols = remove(t, keep)
        note = ""
        if t.config.reconstruct:
            with torch.no_grad():
                model.get_submodule(reader).weight.copy_(least_squares_reader(W, stats.hessian, cols))
            note = ", reader refitted by least squares"
        context.log.append(f"{t.name}: {name} kept {len(keep)} of {len(scores)} {unit} "
                           f"({t.config.importance.value} importance{note})")

    calibrated = [t for t in targets if t.config.importance is UnitImportance.ACTIVATION or t.config.reconstruct]
    for t in targets:
        if t not in calibrated:
            process(t, None)
    if calibrated:
        _calibrate(model, calibrated, context, reader_path, name, process)


@register_pass("prune_ffn", PruneFFNConfig, (FFNBlock,))
def prune_ffn(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    def importance(t: Target, act):
        up, down = ffn_layers(t.name, model.get_submodule(t.name))
        return ffn_importance(up, down, t.config.importance, act)

    def remove(t: Target, keep):
        return remove_ffn_neurons(model.get_submodule(t.name), keep)

    _run_structured(model, targets, context, "prune_ffn", "output.dense", importance, remove, "neurons")


@register_pass("prune_heads", PruneHeadsConfig, (AttentionBlock,))
def prune_heads(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    def importance(t: Target, act):
        (q, k, v), o, size = attention_layers(t.name, model.get_submodule(t.name))
        return head_importance(v, o, size, t.config.importance, act)

    def remove(t: Target, keep):
        return remove_heads(model.get_submodule(t.name), keep)

    _run_structured(model, targets, context, "prune_heads", "output.dense", importance, remove, "heads")


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
