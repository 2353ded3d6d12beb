"""Layer widths: slicing Linear / Conv2d / BatchNorm2d layers, and the record that rebuilds pruned shapes.

Structured pruning (passes/structured) removes whole units, so a pruned model no longer matches the
skeleton its architecture builds. A checkpoint records every resizable layer's width
(`record_shapes`), and a load shrinks a freshly built skeleton to them (`apply_shapes`) before
filling it. Slicing keeps the first units here; the pruning pass keeps chosen ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelpress.errors import FormatError
from modelpress.nn.registry import kind_of

__all__ = ["MAX_SHAPES", "apply_shapes", "record_shapes", "slice_batchnorm", "slice_conv", "slice_linear"]

MAX_SHAPES = 100_000  # entries a checkpoint may declare


def _sliced(layer: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None, make) -> nn.Module:
    """`make(W)` for W = layer's weight restricted to output `rows` and input `cols`, filled with W and the bias."""
    W = layer.weight.detach()
    if rows is not None:
        W = W[rows]
    if cols is not None:
        W = W[:, cols]
    new = make(W)
    with torch.no_grad():
        new.weight.copy_(W)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if rows is None else layer.bias.detach()[rows])
    new.train(layer.training)
    return new


def slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only output rows `rows` and input columns `cols` of `layer`."""
    return _sliced(layer, rows, cols, lambda W: nn.Linear(W.shape[1], W.shape[0], bias=layer.bias is not None,
                                                          device=W.device, dtype=W.dtype))


def slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    """A new Conv2d (groups 1) holding only output channels `out_idx` and input channels `in_idx`."""
    return _sliced(conv, out_idx, in_idx, lambda W: nn.Conv2d(
        W.shape[1], W.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1, conv.bias is not None,
        conv.padding_mode, device=W.device, dtype=W.dtype))


def slice_batchnorm(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    """A new BatchNorm2d holding only channels `idx` (affine parameters and running statistics)."""
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.affine else None)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach()[idx])
            new.bias.copy_(bn.bias.detach()[idx])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[idx])
            new.running_var.copy_(bn.running_var[idx])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _shape_entry(module: nn.Module) -> dict[str, Any] | None:
    kind = kind_of(module)
    if kind == "linear":
        return {"type": "linear", "size": [module.out_features, module.in_features]}
    if kind == "conv2d":
        return {"type": "conv2d", "size": [module.out_channels, module.in_channels]}
    if type(module) is nn.BatchNorm2d:
        return {"type": "batchnorm2d", "size": [module.num_features]}
    heads, size = getattr(module, "num_attention_heads", None), getattr(module, "attention_head_size", None)
    if isinstance(heads, int) and isinstance(size, int) and isinstance(getattr(module, "all_head_size", None), int):
        return {"type": "heads", "size": [heads]}
    return None


def record_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The width of every layer structured pruning can change, by module name (for a checkpoint)."""
    return {name: entry for name, module in model.named_modules() if name and (entry := _shape_entry(module))}


def apply_shapes(model: nn.Module, shapes: Any) -> None:
    """Shrink the layers of a freshly built `model` to the recorded widths (values come later, from the state).

    `shapes` comes from a file: it is checked entry by entry; widths may only shrink, never grow.
    """
    if not isinstance(shapes, dict) or len(shapes) > MAX_SHAPES:
        raise FormatError("'shapes' must map module names to their recorded widths")
    known = dict(model.named_modules())
    for name, entry in shapes.items():
        module = known.get(name) if name else None
        current = _shape_entry(module) if module is not None else None
        if current is None or not isinstance(entry, dict) or entry.get("type") != current["type"]:
            raise FormatError(f"shape entry {name!r} does not match a layer of the model")
        size = entry.get("size")
        if (not isinstance(size, list) or len(size) != len(current["size"])
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= c
                           for s, c in zip(size, current["size"]))):
            raise FormatError(f"shape entry {name!r} has size {size!r}; widths must lie in 1..{current['size']}")
        if size != current["size"]:
            _resize(model, name, module, size)


def _resize(model: nn.Module, name: str, module: nn.Module, size: list[int]) -> None:
    first = [torch.arange(s) for s in size]
    if type(module) is nn.Linear:
        model.set_submodule(name, slice_linear(module, rows=first[0], cols=first[1]))
    elif type(module) is nn.Conv2d and module.groups == 1:
        model.set_submodule(name, slice_conv(module, out_idx=first[0], in_idx=first[1]))
    elif type(module) is nn.BatchNorm2d:
        model.set_submodule(name, slice_batchnorm(module, first[0]))
    elif _shape_entry(module)["type"] == "heads":
        module.num_attention_heads = size[0]
        module.all_head_size = size[0] * module.attention_head_size
    else:
        raise FormatError(f"layer {name!r} ({type(module).__name__}) cannot be resized when loading")
