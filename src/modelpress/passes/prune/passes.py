"""The pruning passes (module surgery): magnitude, Wanda and SparseGPT swap each selected layer for its
compressed twin holding a `SparseTensor` of the kept values."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.calibration import run_blockwise
from modelpress.encodings import DenseTensor, Encoding, quantize_weight
from modelpress.encodings.sparse import SparseTensor, sparsify
from modelpress.errors import ConfigError
from modelpress.nn import install
from modelpress.passes.base import PassContext, Target, register_pass, tied_partners, weight_matrix
from modelpress.passes.linalg import output_error
from modelpress.passes.prune.config import MagnitudeConfig, Scope, SparseGPTConfig, SparsityConfig, WandaConfig
from modelpress.passes.prune.masks import global_masks, nm_mask, topk_mask, wanda_scores
from modelpress.passes.prune.sparsegpt import check_kept_groups, sparsegpt_prune

__all__ = ["check_untied", "layer_mask", "magnitude", "sparsegpt", "wanda"]


def layer_mask(scores: torch.Tensor, cfg: SparsityConfig, per_row: bool) -> torch.Tensor:
    """The keep mask of one layer's (R, C) scores under `cfg`'s pattern (N:M, or its sparsity per row or layer)."""
    nm = cfg.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    return topk_mask(scores, cfg.target_sparsity, per_row)


def _value_encoder(cfg: SparsityConfig, name: str):
    """Kept values -> their encoding: float32, or quantised per row / per group of kept values."""
    scheme = cfg.scheme
    if scheme is None:
        return DenseTensor

    def encode(v: torch.Tensor) -> Encoding:
        if v.dim() != 2:
            raise ConfigError(f"layer {name!r}: quantised kept values need the same count in every row")
        try:
            return quantize_weight(v, scheme, cfg.quant.search)
        except ConfigError as exc:
            raise ConfigError(f"layer {name!r}: {exc} (groups run over the {v.shape[1]} kept values of a row)") from None

    return encode


def _prune(model: nn.Module, target: Target, mask: torch.Tensor) -> SparseTensor:
    """Swap the target for its compressed twin keeping the weights where `mask` (R, C) is true."""
    cfg: SparsityConfig = target.config
    W = target.module.weight.detach().float()
    try:
        enc = sparsify(W, mask.reshape(W.shape), nm=cfg.nm, encode_values=_value_encoder(cfg, target.name),
                       layout=cfg.positions)
    except ConfigError as exc:
        raise ConfigError(f"layer {target.name!r}: {exc}") from None
    install(model, target.name, enc, cfg.kernel)
    return enc


def check_untied(model: nn.Module, targets: list[Target], pass_name: str) -> None:
    """Refuse targets whose weight is tied to another module's (a language model's output layer and token
    embedding): a sparse weight for one would untie them, and an embedding table is not pruned."""
    for name, partners in tied_partners(model, [t.name for t in targets]).items():
        if partners:
            raise ConfigError(f"layer {name!r} shares its weight with {partners[0]!r}: {pass_name} would untie them; "
                              f"leave it out of the stage (targets: ignore: [{name!r}])")


def _check_width(target: Target) -> None:
    nm = target.config.nm
    cols = weight_matrix(target.module).shape[1]
    if nm is not None and cols % nm[1]:
        raise ConfigError(f"layer {target.name!r}: pattern {target.config.pattern} needs an input width divisible by "
                          f"{nm[1]}, got {cols}: exclude the layer or use unstructured sparsity")


def _log(context: PassContext, target: Target, enc: SparseTensor, method: str, extra: str = "") -> None:
    context.log.append(f"{target.name}: {method} {target.config.describe()}, density {enc.density:.3f}, "
                       f"{enc.layout.value} positions, {enc.bits_per_weight:.2f} bits/weight{extra}")


@register_pass("magnitude", MagnitudeConfig, (nn.Linear, nn.Conv2d))
def magnitude(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    check_untied(model, targets, "magnitude")
    for t in targets:
        _check_width(t)
    global_groups: dict[float, list[Target]] = {}
    for t in targets:
        if t.config.scope is Scope.GLOBAL:
            global_groups.setdefault(t.config.target_sparsity, []).append(t)
            continue
        mask = layer_mask(weight_matrix(t.module).abs(), t.config, per_row=t.config.scope is Scope.ROW)
        _log(context, t, _prune(model, t, mask), "magnitude")
    for sparsity, group in global_groups.items():
        masks = global_masks([weight_matrix(t.module).abs() for t in group], sparsity)
        for t, mask in zip(group, masks):
            _log(context, t, _prune(model, t, mask), "magnitude (global)")


def _calibrated(model: nn.Module, targets: list[Target], context: PassContext, name: str, process) -> None:
    check_untied(model, targets, name)
    for t in targets:
        _check_width(t)
    run_blockwise(model, targets, context.calibration, lambda group: [process(t, s) for t, s in group],
                  context.log, pass_name=name)


@register_pass("wanda", WandaConfig, (nn.Linear,))
def wanda(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    def process(t: Target, stats) -> None:
        mask = layer_mask(wanda_scores(weight_matrix(t.module), stats.hessian.diagonal()), t.config, per_row=True)
        _log(context, t, _prune(model, t, mask), "wanda", f" ({stats.tokens} tokens)")

    _calibrated(model, targets, context, "wanda", process)


@register_pass("sparsegpt", SparseGPTConfig, (nn.Linear,))
def sparsegpt(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    check_untied(model, targets, "sparsegpt")
    for t in targets:  # fail on groups that do not fit the blocks before spending time on calibration
        _check_sparsegpt_groups(t)

    def process(t: Target, stats) -> None:
        cfg: SparseGPTConfig = t.config
        W = weight_matrix(t.module)
        H = stats.hessian * (2.0 / max(stats.tokens, 1))  # (C, C)
        result = sparsegpt_prune(W, H, cfg.target_sparsity, cfg.nm, cfg.scheme, cfg.quant.search, cfg.damp,
                                 cfg.block_size)
        enc = result.encoding(cfg.nm, cfg.scheme, cfg.positions)
        install(model, t.name, enc, cfg.kernel)
        error = output_error(W, result.weight, H)
        _log(context, t, enc, "sparsegpt", f" ({stats.tokens} tokens, relative output error {error:.2e})")

    _calibrated(model, targets, context, "sparsegpt", process)


def _check_sparsegpt_groups(t: Target) -> None:
    cfg: SparseGPTConfig = t.config
    _check_width(t)
    try:
        check_kept_groups(weight_matrix(t.module).shape[1], cfg.target_sparsity, cfg.nm, cfg.scheme, cfg.block_size)
    except ConfigError as exc:
        raise ConfigError(f"layer {t.name!r}: {exc}") from None
