"""Structured pruning that changes shapes: FFN neurons, attention heads and convolution channels.

A removed unit takes every weight that produces it and every weight that reads it, so the model
runs with really smaller matrices, without masks:

- `prune_ffn` on a BERT-style layer (``intermediate.dense`` then ``output.dense``): neuron i is
  row i of the first Linear (and its bias) and column i of the second.
- `prune_heads` on a BERT-style attention (``self.query/key/value`` then ``output.dense``): head h
  is rows [h*d, (h+1)*d) of query, key and value and those columns of the output Linear; the
  attention's ``num_attention_heads`` and ``all_head_size`` follow.
- `prune_channels` on a Conv2d of a plain CNN: output channel c of the conv (and of a BatchNorm2d
  after it), and the input channel c of the next conv, or the block of columns c*S..(c+1)*S of a
  Linear after a flatten (S = spatial size). Which layers read a conv's output is found by
  tracing the model with torch.fx; anything but channel-wise layers (BatchNorm, activations,
  pooling, dropout) between a conv and its readers is refused.

Importance of a unit is the product of the norms of what produces it and what reads it
(``l1`` or ``l2``; a unit nothing reads, or nothing feeds, scores 0), or, with calibration data,
its mean absolute activation times the norm of what reads it (``activation``). Units are ranked
per layer; `ratio` of them are removed (at least one is kept).

With `reconstruct` (FFN neurons and heads, calibration data needed), the Linear that reads the
units is refitted to the kept ones by least squares on its calibration inputs, so it recovers what
the removed units contributed wherever the kept ones correlate with them (on MiniLM, 30% of FFN
neurons removed: mean cosine 0.86 -> 0.95; benchmarks/results_prune.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ConfigError, UnsupportedError
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.prune import pruned_count

__all__ = [
    "AttentionBlock",
    "ChannelPlan",
    "FFNBlock",
    "StructuredConfig",
    "UnitImportance",
    "apply_shapes",
    "channel_plan",
    "keep_units",
    "least_squares_reader",
    "record_shapes",
    "remove_conv_channels",
    "remove_ffn_neurons",
    "remove_heads",
    "slice_conv",
    "slice_linear",
]


class UnitImportance(str, Enum):
    L1 = "l1"  # |producer|_1 * |reader|_1
    L2 = "l2"  # |producer|_2 * |reader|_2
    ACTIVATION = "activation"  # mean |activation| on calibration data * |reader|_2


@dataclass(frozen=True)
class StructuredConfig:
    """Remove `ratio` of the units (neurons, heads or channels) of each selected layer."""

    ratio: float = 0.3
    importance: UnitImportance = UnitImportance.L2
    reconstruct: bool = False  # refit the reading Linear to the kept units by least squares (calibration)
    # round the kept count down to a multiple of this (CPU matmul kernels run widths that are
    # multiples of 8 or 16 faster than odd ones), so at least `ratio` is removed
    multiple_of: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "importance", UnitImportance(self.importance))
        except ValueError:
            raise ConfigError(f"importance {self.importance!r} is not valid: use one of "
                              f"{[e.value for e in UnitImportance]}") from None
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio {self.ratio!r} is not valid: give the fraction of units to remove, in [0, 1)")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ConfigError(f"multiple_of {self.multiple_of!r} is not valid: give a positive integer, e.g. 16")
        if not isinstance(self.reconstruct, bool):
            raise ConfigError(f"reconstruct must be true or false, got {self.reconstruct!r}")
        if self.version != 1:
            raise ConfigError(f"structured config version {self.version!r} is not supported: this modelpress reads 1")


# ---------------------------------------------------------------------------------------------
# Unit selection and module slicing (pure: modules in, new modules out)


def keep_units(importance: torch.Tensor, ratio: float, multiple_of: int = 1) -> torch.Tensor:
    """Indices (ascending) of the units kept: all but the `ratio` least important, at least one.

    With `multiple_of`, the kept count is rounded down to a multiple of it (never below one multiple).
    """
    n = importance.numel()
    keep = max(1, n - pruned_count(n, ratio))
    if multiple_of > 1 and keep >= multiple_of:
        keep -= keep % multiple_of
    order = torch.sort(importance, descending=True, stable=True).indices[:keep]
    return order.sort().values


def _norm(x: torch.Tensor, dim: int, kind: UnitImportance) -> torch.Tensor:
    return x.abs().sum(dim) if kind is UnitImportance.L1 else x.pow(2).sum(dim).sqrt()


def slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only output rows `rows` and input columns `cols` of `layer`."""
    W = layer.weight.detach()
    if rows is not None:
        W = W[rows]
    if cols is not None:
        W = W[:, cols]
    new = nn.Linear(W.shape[1], W.shape[0], bias=layer.bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if rows is None else layer.bias.detach()[rows])
    new.train(layer.training)
    return new


def slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    """A new Conv2d (groups 1) holding only output channels `out_idx` and input channels `in_idx`."""
    W = conv.weight.detach()
    if out_idx is not None:
        W = W[out_idx]
    if in_idx is not None:
        W = W[:, in_idx]
    new = nn.Conv2d(W.shape[1], W.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1,
                    conv.bias is not None, conv.padding_mode, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach() if out_idx is None else conv.bias.detach()[out_idx])
    new.train(conv.training)
    return new


def slice_batchnorm(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
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


# ---------------------------------------------------------------------------------------------
# BERT-style FFN neurons and attention heads


class _Shape(type):
    """A pseudo-type matched by structure, so that recipes can select blocks of any transformer class."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return cls.matches(obj)


def _child(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


class FFNBlock(metaclass=_Shape):
    """A module with ``intermediate.dense`` (up) and ``output.dense`` (down), as BERT's layers."""

    @staticmethod
    def matches(obj: Any) -> bool:
        return isinstance(obj, nn.Module) and all(_child(obj, p) is not None for p in ("intermediate.dense",
                                                                                         "output.dense"))


class AttentionBlock(metaclass=_Shape):
    """A module with ``self.query/key/value`` and ``output.dense``, as BERT's attention."""

    @staticmethod
    def matches(obj: Any) -> bool:
        return isinstance(obj, nn.Module) and all(
            _child(obj, p) is not None for p in ("self.query", "self.key", "self.value", "output.dense"))


def _plain_linears(name: str, block: nn.Module, paths: tuple[str, ...]) -> list[nn.Linear]:
    layers = [_child(block, p) for p in paths]
    for path, layer in zip(paths, layers):
        if type(layer) is not nn.Linear:
            raise ConfigError(f"cannot structurally prune {name!r}: {path} is a {type(layer).__name__}, not a plain "
                              "Linear; prune before quantising (put the structured stage first)")
    return layers


def ffn_layers(name: str, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    up, down = _plain_linears(name, block, ("intermediate.dense", "output.dense"))
    if down.in_features != up.out_features:
        raise ConfigError(f"cannot structurally prune {name!r}: output.dense reads {down.in_features} features but "
                          f"intermediate.dense makes {up.out_features}")
    return up, down


def ffn_importance(up: nn.Linear, down: nn.Linear, kind: UnitImportance, act: torch.Tensor | None = None):
    """(U,) importance of each neuron: producer norm (row and bias of `up`) x reader norm (column of `down`)."""
    reader = _norm(down.weight.detach(), 0, UnitImportance.L2 if act is not None else kind)  # (U,)
    if act is not None:
        return act.to(reader.dtype) * reader
    producer = up.weight.detach()
    if up.bias is not None:
        producer = torch.cat([producer, up.bias.detach()[:, None]], 1)  # (U, C+1)
    return _norm(producer, 1, kind) * reader


def remove_ffn_neurons(block: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Keep only neurons `keep` of a BERT-style layer's FFN (in place); returns the kept columns of output.dense."""
    up, down = ffn_layers("block", block)
    block.intermediate.dense = slice_linear(up, rows=keep)
    block.output.dense = slice_linear(down, cols=keep)
    return keep


def attention_layers(name: str, attn: nn.Module) -> tuple[list[nn.Linear], nn.Linear, int]:
    q, k, v, o = _plain_linears(name, attn, ("self.query", "self.key", "self.value", "output.dense"))
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
    reader_norm = _norm(reader, 1, UnitImportance.L2 if act is not None else kind)
    if act is not None:
        return act.reshape(-1, size).sum(1).to(reader_norm.dtype) * reader_norm
    producer = v.weight.detach()
    if v.bias is not None:
        producer = torch.cat([producer, v.bias.detach()[:, None]], 1)
    return _norm(producer.reshape(-1, size * producer.shape[1]), 1, kind) * reader_norm


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


# ---------------------------------------------------------------------------------------------
# Conv2d channels of plain CNNs (found with torch.fx)

_CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid,
                        nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d)
_CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, torch.tanh,
                          torch.sigmoid, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d)
_CHANNELWISE_METHODS = ("relu", "sigmoid", "tanh", "contiguous")


@dataclass
class ChannelPlan:
    """What removing output channels of conv `name` touches."""

    name: str
    batchnorms: list[str] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)  # read the channels as input channels
    linears: list[tuple[str, int]] = field(default_factory=list)  # read them flattened: (name, spatial size)


def _trace(model: nn.Module):
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types on untraceable code
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UnsupportedError(f"cannot trace {type(model).__name__} with torch.fx to find which layers read a conv's "
                               f"channels ({type(exc).__name__}: {first}); channel pruning needs a plain CNN") from None


def channel_plan(model: nn.Module, graph, name: str) -> ChannelPlan:
    """Follow conv `name`'s output through channel-wise layers to every layer that reads it."""
    conv = model.get_submodule(name)
    if type(conv) is not nn.Conv2d or conv.groups != 1:
        raise ConfigError(f"cannot prune channels of {name!r}: only plain Conv2d layers with groups=1 (prune before "
                          "quantising)")
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None:
        raise UnsupportedError(f"cannot prune channels of {name!r}: the traced model never calls it")
    plan = ChannelPlan(name)
    frontier = [(node, False)]
    while frontier:
        current, flat = frontier.pop()
        if not current.users:
            raise UnsupportedError(f"cannot prune channels of {name!r}: its output is never read")
        for user in current.users:
            step = _follow(model, plan, user, current, flat, conv.out_channels)
            if step is not None:
                frontier.append((user, step))
    return plan


def _follow(model: nn.Module, plan: ChannelPlan, user, source, flat: bool, channels: int) -> bool | None:
    """Record `user` if it reads the channels (None: stop here), else whether it passes them on flattened."""
    def refuse(why: str) -> UnsupportedError:
        return UnsupportedError(f"cannot prune channels of {plan.name!r}: its output reaches {user.format_node()!r}, "
                                f"{why}; only plain CNNs (conv -> [bn] -> activation/pool -> conv, or flatten -> "
                                "linear) are supported: exclude this layer")

    if (user.op == "call_method" and user.target in ("size", "dim")) or (user.op == "call_function"
                                                                     and user.target is getattr):
        return None  # reads the shape, not the values
    others = [a for a in list(user.args[1:]) + list(user.kwargs.values()) if hasattr(a, "op")]
    if user.op == "call_module":
        mod = model.get_submodule(user.target)
        if type(mod) is nn.Conv2d and not flat:
            if mod.groups != 1:
                raise refuse("a grouped convolution")
            plan.convs.append(user.target)
            return None
        if type(mod) is nn.Linear and flat:
            if mod.in_features % channels:
                raise refuse(f"a Linear of {mod.in_features} inputs, not a multiple of {channels} channels")
            plan.linears.append((user.target, mod.in_features // channels))
            return None
        if type(mod) is nn.BatchNorm2d and not flat:
            plan.batchnorms.append(user.target)
            return False
        if isinstance(mod, _CHANNELWISE_MODULES) and not (flat and isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d))):
            return flat
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1 and not flat:
            return True
        raise refuse(f"a {type(mod).__name__}")
    if user.args[0] is not source or others:
        if not (user.args[0] is source and user.op == "call_method" and user.target in ("view", "reshape")
                and len(user.args) == 3 and user.args[2] == -1 and not flat):  # x.view(x.size(0), -1)
            raise refuse("an operation that mixes it with another tensor")
        return True
    if user.op == "call_function" and user.target in _CHANNELWISE_FUNCTIONS:
        return flat
    if user.op == "call_method" and user.target in _CHANNELWISE_METHODS:
        return flat
    if not flat and ((user.op == "call_method" and user.target == "flatten" and tuple(user.args[1:]) == (1,))
                     or (user.op == "call_function" and user.target is torch.flatten and tuple(user.args[1:]) == (1,))):
        return True
    raise refuse("an operation that is not channel-wise")


def conv_importance(model: nn.Module, plan: ChannelPlan, kind: UnitImportance, act: torch.Tensor | None = None):
    """(C_out,) producer norm (filter and bias, BatchNorm folded in) x reader norm (input slices of the readers)."""
    conv = model.get_submodule(plan.name)
    reader = torch.zeros(conv.out_channels, dtype=torch.float64)
    rkind = UnitImportance.L2 if act is not None else kind
    for name in plan.convs:
        reader += _norm(model.get_submodule(name).weight.detach().transpose(0, 1).flatten(1).double(), 1, rkind) ** 2
    for name, spatial in plan.linears:
        W = model.get_submodule(name).weight.detach().double()  # (out, C*S)
        reader += _norm(W.reshape(W.shape[0], -1, spatial).transpose(0, 1).flatten(1), 1, rkind) ** 2
    reader = reader.sqrt()
    if act is not None:
        return act.double() * reader
    W = conv.weight.detach().flatten(1).double()  # (C, in*kh*kw)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(len(W), dtype=torch.float64)
    for name in plan.batchnorms:  # fold y = gamma (x - mean) / sigma + beta into the filter
        bn = model.get_submodule(name)
        gamma = bn.weight.detach().double() if bn.affine else torch.ones(len(W), dtype=torch.float64)
        beta = bn.bias.detach().double() if bn.affine else torch.zeros(len(W), dtype=torch.float64)
        if bn.track_running_stats:
            scale = gamma / (bn.running_var.double() + bn.eps).sqrt()
            W, b = W * scale[:, None], (b - bn.running_mean.double()) * scale + beta
    return _norm(torch.cat([W, b[:, None]], 1), 1, kind) * reader


def remove_conv_channels(model: nn.Module, plan: ChannelPlan, keep: torch.Tensor) -> None:
    """Keep only output channels `keep` of conv `plan.name` and slice every layer that reads them (in place)."""
    model.set_submodule(plan.name, slice_conv(model.get_submodule(plan.name), out_idx=keep))
    for name in plan.batchnorms:
        model.set_submodule(name, slice_batchnorm(model.get_submodule(name), keep))
    for name in plan.convs:
        model.set_submodule(name, slice_conv(model.get_submodule(name), in_idx=keep))
    for name, spatial in plan.linears:
        cols = (keep[:, None] * spatial + torch.arange(spatial)).reshape(-1)
        model.set_submodule(name, slice_linear(model.get_submodule(name), cols=cols))


# ---------------------------------------------------------------------------------------------
# The passes


def _calibrate(model: nn.Module, targets: list[Target], context: PassContext, reader_path: str, name: str,
               process) -> None:
    """Calibration statistics of each target's reader Linear, handed to `process(target, stats)` block by block."""
    from modelpress.calibration import run_blockwise

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


@register_pass("prune_ffn", StructuredConfig, (FFNBlock,))
def prune_ffn(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    def importance(t: Target, act):
        up, down = ffn_layers(t.name, model.get_submodule(t.name))
        return ffn_importance(up, down, t.config.importance, act)

    def remove(t: Target, keep):
        return remove_ffn_neurons(model.get_submodule(t.name), keep)

    _run_structured(model, targets, context, "prune_ffn", "output.dense", importance, remove, "neurons")


@register_pass("prune_heads", StructuredConfig, (AttentionBlock,))
def prune_heads(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    def importance(t: Target, act):
        (q, k, v), o, size = attention_layers(t.name, model.get_submodule(t.name))
        return head_importance(v, o, size, t.config.importance, act)

    def remove(t: Target, keep):
        return remove_heads(model.get_submodule(t.name), keep)

    _run_structured(model, targets, context, "prune_heads", "output.dense", importance, remove, "heads")


@register_pass("prune_channels", StructuredConfig, (nn.Conv2d,))
def prune_channels(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    for t in targets:
        if t.config.reconstruct:
            raise ConfigError(f"layer {t.name!r}: reconstruct refits Linear readers of FFN neurons and heads; "
                              "channel pruning does not support it, drop reconstruct")
    graph = _trace(model)
    plans = {t.name: channel_plan(model, graph, t.name) for t in targets}  # refuse before changing anything
    for t in targets:
        act = None
        if t.config.importance is UnitImportance.ACTIVATION:
            act = _channel_activations(model, plans[t.name], context)
        scores = conv_importance(model, plans[t.name], t.config.importance, act)
        keep = keep_units(scores, t.config.ratio, t.config.multiple_of)
        remove_conv_channels(model, plans[t.name], keep)
        context.log.append(f"{t.name}: prune_channels kept {len(keep)} of {len(scores)} channels "
                           f"({t.config.importance.value} importance)")


def _channel_activations(model: nn.Module, plan: ChannelPlan, context: PassContext) -> torch.Tensor:
    """Mean |x| per channel of what the conv's first reader receives (after BatchNorm, activation, pooling)."""
    from modelpress.calibration import prepare_batches
    from modelpress.errors import CalibrationError

    if context.calibration is None:
        raise CalibrationError(f"activation importance for {plan.name!r} needs calibration data: pass "
                               "compress(..., calibration=[input tensors])")
    channels = model.get_submodule(plan.name).out_channels
    reader = plan.convs[0] if plan.convs else plan.linears[0][0]
    total, count = torch.zeros(channels, dtype=torch.float64), 0

    def hook(module, args):
        nonlocal total, count
        x = args[0].detach().abs().double()
        x = x.reshape(x.shape[0], channels, -1)  # (B, C, H*W) for a conv, (B, C, S) after a flatten
        total += x.sum((0, 2))
        count += x.shape[0] * x.shape[2]

    handle = model.get_submodule(reader).register_forward_pre_hook(hook)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in prepare_batches(model, context.calibration):
                batch.run(model)
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.train(mode)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Shapes in checkpoints: what a loader must resize in a freshly built skeleton

MAX_SHAPES = 100_000  # entries a checkpoint may declare


def _shape_entry(module: nn.Module) -> dict[str, Any] | None:
    from modelpress.nn import CompressedConv2d, CompressedLinear

    if isinstance(module, (nn.Linear, CompressedLinear)):
        return {"type": "linear", "size": [module.out_features, module.in_features]}
    if isinstance(module, (nn.Conv2d, CompressedConv2d)):
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
    from modelpress.errors import FormatError

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
        from modelpress.errors import FormatError

        raise FormatError(f"layer {name!r} ({type(module).__name__}) cannot be resized when loading")
