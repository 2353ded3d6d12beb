"""A drop-in nn.Conv2d whose weight is an encoding.

The (out, in/groups, kh, kw) weight is encoded as any `Encoding`; a `QuantizedTensor` views it
as the matrix (out, in/groups * kh * kw), one row per output channel (`encodings.views.as_matrix`),
so per-channel and per-group schemes work as they do for Linear layers. The module decodes the
weight once, on first use, to a dense fp32 copy and runs `F.conv2d` on it: PyTorch has no
low-bit convolution kernel for CPUs, and a conv weight is small next to its activations.

A `LowRankTensor` weight W = left (R, r) @ right (r, Cin*kh*kw) runs as two convolutions when
that is cheaper (r (R + Cin*kh*kw) < R Cin*kh*kw, `factored_is_cheaper`) and groups == 1: `right`
as r filters (r, Cin, kh, kw) with the conv's stride, padding and dilation, then `left` as a 1x1
conv from r to R channels, with the bias. That is the same sum of products, grouped differently
(tests compare it with the decoded weight's conv). Otherwise the weight is decoded once.

The module registers with `nn.registry` as "conv2d": its manifest entry records the geometry,
which a load checks against the encoding and the skeleton's conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import Encoding, LowRankTensor
from modelpress.errors import ConfigError, FormatError
from modelpress.nn.registry import KEEP, register_compressed, source_bias

__all__ = ["CompressedConv2d", "PADDING_NAMES", "CONV_GEOMETRY", "conv_geometry"]

PADDING_NAMES = ("valid", "same")  # the string paddings F.conv2d accepts
MAX_CONV_PARAM = 2**16  # bound on stride / padding / dilation / groups (what a checkpoint may claim)


def _pair(value: int | tuple[int, ...] | list[int], name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each in [minimum, MAX_CONV_PARAM], as a pair."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= MAX_CONV_PARAM for v in pair)
    ):
        raise ConfigError(
            f"conv {name} must be an int or a pair of ints in [{minimum}, {MAX_CONV_PARAM}], got {value!r}"
        )
    return int(pair[0]), int(pair[1])


CONV_GEOMETRY = ("stride", "padding", "dilation", "groups")


def conv_geometry(conv: nn.Conv2d) -> dict:
    """stride, padding, dilation and groups of an nn.Conv2d that a compressed twin can reproduce."""
    if conv.padding_mode != "zeros":
        raise ConfigError(f"conv padding_mode {conv.padding_mode!r} is not supported: only 'zeros'; ignore this layer")
    return {name: getattr(conv, name) for name in CONV_GEOMETRY}


@register_compressed("conv2d", replaces=nn.Conv2d)
class CompressedConv2d(nn.Module):
    """y = conv2d(x, W, b) with W held as an encoding and decoded once to fp32 on first use."""

    def __init__(
        self,
        weight: Encoding,
        bias: torch.Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
    ):
        super().__init__()
        if len(weight.shape) != 4:
            raise ConfigError(f"a conv2d weight must be 4-D (out, in/groups, kh, kw), got shape {weight.shape}")
        out_channels, in_per_group, kh, kw = weight.shape
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_CONV_PARAM:
            raise ConfigError(f"conv groups must be a positive int, got {groups!r}")
        if out_channels % groups:
            raise ConfigError(f"conv groups {groups} does not divide the {out_channels} output channels")
        if isinstance(padding, str):
            if padding not in PADDING_NAMES:
                raise ConfigError(f"conv padding {padding!r} is not valid: use {PADDING_NAMES} or ints")
        else:
            padding = _pair(padding, "padding", 0)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        if padding == "same" and self.stride != (1, 1):
            raise ConfigError("conv padding 'same' needs stride 1 (as in nn.Conv2d)")
        self.padding = padding
        self.groups = groups
        self.out_channels, self.in_channels, self.kernel_size = out_channels, in_per_group * groups, (kh, kw)
        if bias is not None and tuple(bias.shape) != (out_channels,):
            raise ConfigError(f"conv bias has shape {tuple(bias.shape)}, expected ({out_channels},)")
        self.encoding = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._dense: torch.Tensor | None = None
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (r, Cin, kh, kw), (R, r, 1, 1)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight: Encoding) -> "CompressedConv2d":
        """The compressed twin of `conv` (same geometry and bias), with `weight` as its weight."""
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise ConfigError(f"encoded weight has shape {weight.shape}, the conv expects {tuple(conv.weight.shape)}")
        return cls.build(conv, weight)

    @classmethod
    def build(cls, source: nn.Module, weight: Encoding, kernel=None, bias=KEEP) -> "CompressedConv2d":
        """The twin of a conv-like `source` (same stride, padding, dilation, groups); `kernel` is not used."""
        if isinstance(source, nn.Conv2d):
            geometry = conv_geometry(source)  # refuses padding modes other than zeros
        else:  # a compressed conv or a training stand-in
            geometry = {k: getattr(source, k) for k in CONV_GEOMETRY}
        return cls(weight, source_bias(source, bias), **geometry)

    def manifest_fields(self) -> dict:
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": padding,
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None}

    @classmethod
    def from_manifest(cls, name: str, entry: dict, weight: Encoding, current: nn.Module) -> "CompressedConv2d":
        """The conv of a manifest entry whose geometry is checked against the encoding and the model's conv."""
        if len(weight.shape) != 4 or entry.get("kernel_size") != list(weight.shape[2:]):
            raise FormatError(f"module {name!r} has kernel_size {entry.get('kernel_size')!r}, "
                              f"its weight has shape {weight.shape}")
        groups, bias = entry.get("groups"), entry.get("bias")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or not isinstance(bias, bool):
            raise FormatError(f"module {name!r} has invalid groups {groups!r} or bias {bias!r}")
        if weight.shape[1] * groups != current.in_channels or bias != (current.bias is not None):
            raise FormatError(f"module {name!r} (groups {groups}, bias {bias}) does not match the model's "
                              f"{current.in_channels} input channels and bias {current.bias is not None}")
        for key in ("stride", "padding", "dilation"):
            value = entry.get(key)
            if not (isinstance(value, list) or (key == "padding" and isinstance(value, str))):
                raise FormatError(f"module {name!r} has an invalid {key} {value!r}")
        bias_init = torch.zeros(weight.shape[0]) if bias else None  # filled by the state dict
        return cls(weight, bias_init, entry["stride"], entry["padding"], entry["dilation"], groups)

    @property
    def runs_factors(self) -> bool:
        """Whether forward runs a low-rank weight as two convolutions (see the module docstring)."""
        return isinstance(self.encoding, LowRankTensor) and self.encoding.factored_is_cheaper and self.groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.data
        if self.runs_factors:
            return self._low_rank(x, bias)
        if self._dense is None:
            self._dense = self.encoding.decode(torch.float32).contiguous()
        return F.conv2d(x, self._dense, bias, self.stride, self.padding, self.dilation, self.groups)

    def _low_rank(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._factors is None:
            left, right = self.encoding.factors(torch.float32)  # (R, r), (r, Cin*kh*kw)
            rank = left.shape[1]
            self._factors = (right.reshape(rank, *self.encoding.shape[1:]).contiguous(),
                             left.reshape(*left.shape, 1, 1).contiguous())
        right, left = self._factors
        h = F.conv2d(x, right, None, self.stride, self.padding, self.dilation)  # (B, r, H', W')
        return F.conv2d(h, left, bias)  # (B, R, H', W')

    def release(self) -> None:
        """Drop the decoded copy (or factors); the next call decodes again."""
        self._dense = None
        self._factors = None

    @property
    def weight(self) -> torch.Tensor:
        return self.encoding.decode(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"encoding={self.encoding.describe()}"
        )
