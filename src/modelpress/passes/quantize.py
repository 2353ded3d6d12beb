"""Round-to-nearest weight quantisation (min-max or error-minimising ranges) and dynamic int8 (W8A8)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from modelpress.encodings import QuantScheme, quantize
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR, _grouped, as_matrix, minmax_params
from modelpress.encodings.range_search import mse_params
from modelpress.errors import ConfigError
from modelpress.nn import CompressedConv2d, CompressedEmbedding, CompressedLinear, Kernel
from modelpress.passes.base import PassContext, Target, register_pass

__all__ = ["RangeSearch", "RTNConfig", "DynamicInt8Config", "quantize_weight"]


class RangeSearch(str, Enum):
    MINMAX = "minmax"  # each group's full range
    MSE = "mse"  # clipping search + least-squares refinement of each group's scale and zero


@dataclass(frozen=True)
class RTNConfig:
    """Weight-only round-to-nearest quantisation; activations stay float."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | str = "channel"
    search: RangeSearch = RangeSearch.MINMAX
    kernel: Kernel = Kernel.AUTO
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", RangeSearch(self.search))
        object.__setattr__(self, "kernel", Kernel(self.kernel))
        if self.kernel is Kernel.DYNAMIC_INT8:
            raise ConfigError("kernel dynamic_int8 quantises activations: use the dynamic_int8 pass for W8A8")
        self.scheme  # validates bits and group size

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.symmetric, self.group_size)


@dataclass(frozen=True)
class DynamicInt8Config:
    """W8A8: int8 symmetric weights, activations quantised per call by fbgemm's dynamic kernel.

    `weight_bits=7` keeps every u8 x s8 pair sum inside int16 on AVX2 CPUs without VNNI, so the
    kernel can give activations their full 8-bit range; 8 forces fbgemm's reduced 7-bit activations.
    """

    group_size: int | str = "channel"
    weight_bits: int = 7
    search: RangeSearch = RangeSearch.MSE
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", RangeSearch(self.search))
        if self.weight_bits not in (7, 8):
            raise ConfigError(f"weight_bits {self.weight_bits} is not valid for dynamic int8: use 7 or 8")
        if QuantScheme(8, True, self.group_size).group_size not in (PER_CHANNEL, PER_TENSOR):
            raise ConfigError("dynamic int8 takes group_size 'channel' or 'tensor' (fbgemm has no groups)")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(8, True, self.group_size)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, search: RangeSearch, max_code: int | None = None):
    """Quantise one weight tensor; `max_code` narrows a symmetric range (7-bit values in int8 codes)."""
    if search is RangeSearch.MSE:
        scale, zero = mse_params(w, scheme)
    else:
        scale = zero = None
    if max_code is not None:  # e.g. |q| <= 63 inside int8: widen the scale, keeping the chosen clipping
        if scale is None:
            scale, zero = minmax_params(_grouped(as_matrix(w.float()), scheme), scheme)
        scale = scale * ((scheme.midpoint - 1) / max_code)
    return quantize(w, scheme, scale, zero)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    model.set_submodule(name, new)


@register_pass("rtn", RTNConfig, (nn.Linear, nn.Embedding, nn.Conv2d))
def rtn(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    for t in targets:
        cfg: RTNConfig = t.config
        try:
            enc = quantize_weight(t.module.weight.data, cfg.scheme, cfg.search)
        except ConfigError as exc:
            raise ConfigError(f"layer {t.name!r}: {exc}") from None
        if isinstance(t.module, nn.Embedding):
            new = CompressedEmbedding.from_embedding(t.module, enc)
        elif isinstance(t.module, nn.Conv2d):  # decode-once dense (cfg.kernel is for Linear layers)
            try:
                new = CompressedConv2d.from_conv(t.module, enc)
            except ConfigError as exc:
                raise ConfigError(f"layer {t.name!r}: {exc}") from None
        else:
            new = CompressedLinear.from_linear(t.module, enc, cfg.kernel)
        _replace(model, t.name, new)
        context.log.append(f"{t.name}: {cfg.scheme.describe()} ({cfg.search.value})")


@register_pass("dynamic_int8", DynamicInt8Config, (nn.Linear,))
def dynamic_int8(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    for t in targets:
        cfg: DynamicInt8Config = t.config
        max_code = 63 if cfg.weight_bits == 7 else None
        enc = quantize_weight(t.module.weight.data, cfg.scheme, cfg.search, max_code)
        _replace(model, t.name, CompressedLinear.from_linear(t.module, enc, Kernel.DYNAMIC_INT8))
        context.log.append(f"{t.name}: W8A8 dynamic, weights int{cfg.weight_bits} {cfg.scheme.describe()}")
