"""Graph simplification for inference: fold BatchNorm into the layer before it, drop Dropout.

In eval mode a BatchNorm is an affine map per channel, y = s * (x - mean) + beta with
s = gamma / sqrt(var + eps), so when its only input is a Conv2d's (or Linear's) output, and that
output goes nowhere else, it folds into the producer: W' = s * W (per output channel) and
b' = s * (b - mean) + beta (a conv without bias gains one). Dropout is the identity at inference.
Both are replaced by nn.Identity, so module names stay stable for recipes and checkpoints.

Producer -> BatchNorm pairs are found on a torch.fx trace of the model (nn.Sequential included);
where the model cannot be traced, each child is traced on its own, recursively. A BatchNorm1d
after a Linear is folded assuming (N, C) activations, its usual use.

A simplified model no longer matches its original skeleton (BatchNorms gone, biases added), so
`simplify` records what it did with the model ({"identity": [names], "bias_added": [names]},
`nn/simplified.py`); checkpoints save that record and `nn.simplified.apply_simplified` replays it
on the skeleton before the weights are loaded.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from modelpress.nn.simplified import BATCHNORM_AFTER, RECORD_KEYS, set_simplified_record, simplified_record
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.config import PassConfig, pass_config

__all__ = ["SimplifyConfig", "find_folds", "fold_batchnorm", "simplify"]


@pass_config
class SimplifyConfig(PassConfig):
    """Fold the selected BatchNorms into their producers and replace the selected Dropouts by Identity."""


# ---------------------------------------------------------------------------------------------
# Folding (pure)


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm1d | nn.BatchNorm2d):
    """(W', b') with W' = s W and b' = s (b - mean) + beta per output channel, s = gamma / sqrt(var + eps)."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    s = torch.rsqrt(var + bn.eps)  # (C,)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    b = torch.zeros_like(mean) if bias is None else bias.detach().double()
    new_bias = s * (b - mean) + (0 if bn.bias is None else bn.bias.detach().double())
    new_weight = weight.detach().double() * s.reshape(-1, *[1] * (weight.dim() - 1))  # (C_out, ...)
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Finding foldable pairs


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with modelpress's own modules (compressed layers) kept as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("modelpress.") or super().is_leaf_module(m, qualname)


def _graphs(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name prefix, fx graph) of `module`, or of its children (recursively) where it cannot be traced."""
    try:
        with warnings.catch_warnings():  # tracing is our analysis, not the user's code: keep it quiet
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(module)
    except Exception:  # fx raises many types on untraceable code; the children may still trace
        graph = None
    if graph is not None:
        yield prefix, graph
        return
    for name, child in module.named_children():
        if next(child.children(), None) is not None:
            yield from _graphs(child, f"{prefix}{name}.")


def find_folds(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """({batchnorm: producer} that fold, {batchnorm: why not} for the others), by module name."""
    modules = dict(model.named_modules())
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = {n for n, m in modules.items() if uses[id(m)] > 1}  # one object under two names
    folds: dict[str, str] = {}
    refused = {n: "it is not reached by a traceable graph" for n, m in modules.items()
               if type(m) in BATCHNORM_AFTER.values()}
    for prefix, graph in _graphs(model):
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        for node in graph.nodes:
            if node.op != "call_module" or type(modules.get(prefix + node.target)) not in BATCHNORM_AFTER.values():
                continue
            name = prefix + node.target
            why = _why_not(modules, shared, calls, prefix, node)
            if why is None:
                folds[name] = prefix + node.args[0].target
                refused.pop(name, None)
            else:
                refused[name] = why
    return folds, refused


def _why_not(modules: dict[str, nn.Module], shared: set[str], calls: Counter, prefix: str, node) -> str | None:
    """Why the BatchNorm called at `node` cannot fold into its input's producer (None: it can)."""
    bn = modules[prefix + node.target]
    if calls[node.target] != 1 or prefix + node.target in shared:
        return "it is used more than once"
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if source is None or getattr(source, "op", None) != "call_module":
        return "its input is not the output of a Conv2d or Linear layer"
    producer = modules.get(prefix + source.target)
    if BATCHNORM_AFTER.get(type(producer)) is not type(bn):
        return f"its input comes from a {type(producer).__name__}, not a Conv2d (BatchNorm2d) or Linear (BatchNorm1d)"
    channels = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
    if channels != bn.num_features:
        return f"it normalises {bn.num_features} features, its producer has {channels} outputs"
    if len(source.users) != 1:
        return "its producer's output has other users"
    if calls[source.target] != 1 or prefix + source.target in shared:
        return "its producer is used more than once"
    return None


# ---------------------------------------------------------------------------------------------
# Surgery


def _apply(model: nn.Module, folds: dict[str, str], dropouts: list[str]) -> dict[str, list[str]]:
    """Fold each BatchNorm of `folds` into its producer, replace it and `dropouts` by Identity; record it."""
    record = {k: list(v) for k, v in (simplified_record(model) or {k: [] for k in RECORD_KEYS}).items()}
    for bn_name, producer_name in folds.items():
        producer, bn = model.get_submodule(producer_name), model.get_submodule(bn_name)
        weight, bias = fold_batchnorm(producer.weight, producer.bias, bn)
        with torch.no_grad():
            producer.weight.copy_(weight)
            if producer.bias is None:
                producer.bias = nn.Parameter(bias, requires_grad=producer.weight.requires_grad)
                record["bias_added"].append(producer_name)
            else:
                producer.bias.copy_(bias)
        model.set_submodule(bn_name, nn.Identity())
        record["identity"].append(bn_name)
    for name in dropouts:
        model.set_submodule(name, nn.Identity())
        record["identity"].append(name)
    set_simplified_record(model, record)
    return simplified_record(model)


def simplify(model: nn.Module) -> nn.Module:
    """Fold every foldable BatchNorm (eval statistics) and drop every Dropout, in place; returns `model`.

    The result computes what `model` computes in eval mode. BatchNorms that cannot fold (their
    producer's output branches, no running statistics, ...) stay; `find_folds` says why.
    """
    folds, _ = find_folds(model)
    dropouts = [n for n, m in model.named_modules() if n and isinstance(m, _DropoutNd)]
    _apply(model, folds, dropouts)
    return model


@register_pass("simplify", SimplifyConfig, (nn.BatchNorm1d, nn.BatchNorm2d, _DropoutNd))
def simplify_pass(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    chosen = {t.name for t in targets}
    folds, refused = find_folds(model)
    folds = {bn: producer for bn, producer in folds.items() if bn in chosen}
    dropouts = [t.name for t in targets if isinstance(t.module, _DropoutNd)]
    _apply(model, folds, dropouts)
    for bn, producer in folds.items():
        context.log.append(f"{bn}: folded into {producer}")
    for name in dropouts:
        context.log.append(f"{name}: dropout removed")
    for bn in sorted(chosen & set(refused)):
        context.log.append(f"{bn}: BatchNorm kept, {refused[bn]}")
