"""Conv2d channels of plain CNNs: which layers read a conv's output (found with torch.fx), ranking, removal.

Output channel c of a conv goes with channel c of a BatchNorm2d after it, and the input channel c
of the next conv, or the block of columns c*S..(c+1)*S of a Linear after a flatten (S = spatial
size). Anything but channel-wise layers (BatchNorm, activations, pooling, dropout) between a conv
and its readers is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from modelpress.calibration import prepare_batches
from modelpress.errors import CalibrationError, ConfigError, UnsupportedError
from modelpress.nn.shapes import slice_batchnorm, slice_conv, slice_linear
from modelpress.passes.structured.config import UnitImportance, unit_norm

__all__ = ["ChannelPlan", "channel_activations", "channel_plan", "conv_importance", "remove_conv_channels", "trace"]


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


def trace(model: nn.Module):
    """The torch.fx graph of `model`, or an UnsupportedError saying why channel pruning cannot follow it."""
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
        reader += unit_norm(model.get_submodule(name).weight.detach().transpose(0, 1).flatten(1).double(), 1, rkind) ** 2
    for name, spatial in plan.linears:
        W = model.get_submodule(name).weight.detach().double()  # (out, C*S)
        reader += unit_norm(W.reshape(W.shape[0], -1, spatial).transpose(0, 1).flatten(1), 1, rkind) ** 2
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
    return unit_norm(torch.cat([W, b[:, None]], 1), 1, kind) * reader


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


def channel_activations(model: nn.Module, plan: ChannelPlan, calibration: Any) -> torch.Tensor:
    """Mean |x| per channel of what the conv's first reader receives (after BatchNorm, activation, pooling)."""
    if calibration is None:
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
            for batch in prepare_batches(model, calibration):
                batch.run(model)
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.train(mode)
    return total / max(count, 1)
