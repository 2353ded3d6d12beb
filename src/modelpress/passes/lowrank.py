"""Low-rank factorisation of Linear and Conv2d weights: truncated SVD, plain or activation-aware.

A weight is viewed as the matrix W (R, C) (a conv weight as (R, Cin*kh*kw)) and replaced by two
thin factors, W ~= left (R, r) @ right (r, C), stored as a `LowRankTensor`; r (R + C) values
instead of R C, and as many fewer multiply-adds at run time (`Kernel.LOW_RANK`).

- Plain (Eckart-Young): the truncated SVD W_r = U_r S_r V_r^T minimises ||W - W'||_F over every
  rank-r W', with error sqrt(sum of the dropped s_i^2).
- Activation-aware (whitening, as in SVD-LLM, Wang et al. 2024): what matters is the layer's
  output on real inputs X (N, C), so minimise ||X W^T - X W'^T||_F. With H = X^T X = L L^T
  (Cholesky, L lower), ||X D^T||_F = ||D L||_F for every D, so the best W' L is the truncated SVD
  of W L = U S V^T and W' = U_r S_r V_r^T L^-1. H is summed over the calibration tokens by the
  shared capture (`calibration.run_blockwise`) and damped by `damp` times its mean diagonal,
  raised tenfold while H + damp I is not positive definite (as GPTQ does).

Factors are balanced, left = U_r sqrt(S_r) and right = sqrt(S_r) V_r^T (L^-1), so that each
component has the same scale in both and both quantise equally well. The rank comes from exactly
one rule: `rank`, `energy` (the smallest r whose kept s_i^2 are at least that fraction of the
total, on the whitened spectrum when activation-aware) or `budget` (r = floor(budget R C / (R + C)):
the factors hold that fraction of the weight's values). With `bits`, both factors are quantised
(asymmetric, `quantize_weight`'s RTN with min-max or MSE-searched ranges); groups run along each
factor's rows: the r components of an output row of `left` (per channel where `group_size` does
not divide r, as the log says), the C inputs of a component of `right`.

A layer whose factors would take at least the bytes of its weight is left unchanged and logged
(`skip_if_larger`), never reported as compressed.

The decompositions (Cholesky, SVD, triangular solves, range searches) run on one intra-op thread,
as GPTQ's do: on the shared 2-core development machine under load, one float64 SVD of a 1536x384
weight took 0.45 s on one thread and 3-4 s on two, the whitened 384x1536 case 1.5 s against 26 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.calibration import run_blockwise
from modelpress.encodings import (PER_CHANNEL, DenseTensor, Encoding, LowRankTensor, QuantScheme, RangeSearch,
                                  quantize_weight)
from modelpress.errors import CalibrationError, ConfigError
from modelpress.nn import Kernel, compressed_twin, install
from modelpress.passes.base import PassContext, Target, register_pass, weight_matrix
from modelpress.passes.config import PassConfig, WeightQuant, enum_value, pass_config
from modelpress.passes.linalg import damped_cholesky, one_thread

__all__ = ["LowRankConfig", "Spectrum", "choose_rank", "factorise", "spectrum", "truncate", "whiten"]

LOW_RANK_KERNELS = (Kernel.AUTO, Kernel.DENSE, Kernel.DECODE_PER_CALL, Kernel.LOW_RANK)


@pass_config
class LowRankConfig(PassConfig):
    """Replace each weight by rank-r factors; the rank from exactly one of rank, energy, budget.

    `quant` quantises both factors (asymmetric; bits None keeps them fp32), in groups along each
    factor's rows, with ranges from its `search`.
    """

    QUANT_KEYS = {"bits": "bits", "group_size": "group_size", "search": "search"}  # always asymmetric

    rank: int | None = None  # the same rank for every layer (capped at min(R, C))
    energy: float | None = None  # keep the smallest rank retaining this fraction of sum s_i^2, in (0, 1]
    budget: float | None = None  # keep this fraction of each layer's parameters, in (0, 1]
    activation_aware: bool = False  # whiten by the calibration inputs' H = X^T X (Linear layers only)
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean (activation-aware only)
    quant: WeightQuant = WeightQuant(bits=None, symmetric=False, group_size="channel", search=RangeSearch.MSE)
    skip_if_larger: bool = True  # leave (and log) layers whose factors would not be smaller
    kernel: Kernel = Kernel.AUTO  # for Linear layers; AUTO runs the factors where that is cheaper

    def validate(self) -> None:
        object.__setattr__(self, "kernel", enum_value(Kernel, self.kernel, "kernel"))
        if self.quant.symmetric:
            raise ConfigError("low-rank factors are quantised asymmetrically: leave symmetric false")
        chosen = [name for name in ("rank", "energy", "budget") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ConfigError(f"low-rank needs exactly one of rank, energy or budget, got {chosen or 'none'}: "
                              "e.g. energy: 0.9 or budget: 0.5")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank {self.rank!r} is not valid: use a positive integer")
        for name in ("energy", "budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise ConfigError(f"{name} {value!r} is not valid: use a fraction in (0, 1], e.g. 0.9")
        for name in ("activation_aware", "skip_if_larger"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp <= 1:
            raise ConfigError(f"damp {self.damp!r} is not valid: use a fraction of the mean Hessian diagonal in [0, 1]")
        if self.kernel not in LOW_RANK_KERNELS:
            raise ConfigError(f"kernel {self.kernel.value!r} cannot run low-rank factors: "
                              f"use one of {[k.value for k in LOW_RANK_KERNELS]}")

    def scheme(self, columns: int) -> QuantScheme | None:
        """The factor scheme for rows of `columns` entries (per channel where group_size does not divide)."""
        scheme = self.quant.scheme
        if scheme is not None and scheme.group_size > 0 and columns % scheme.group_size:
            return QuantScheme(scheme.bits, False, PER_CHANNEL)
        return scheme


# ---------------------------------------------------------------------------------------------
# The algorithm (pure: tensors in, tensors out)


@dataclass(frozen=True)
class Spectrum:
    """The SVD U S V^T of W (plain) or of W L (whitened); everything float64."""

    U: torch.Tensor  # (R, k), k = min(R, C)
    S: torch.Tensor  # (k,) descending
    Vh: torch.Tensor  # (k, C)
    L: torch.Tensor | None = None  # (C, C) lower Cholesky factor of the damped H; None for plain
    damp: float = 0.0  # the damping used (raised where the requested one left H singular)


def whiten(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Lower L with L L^T = H + damp * mean(diag H) * I (float64), raising damp until it exists."""
    return damped_cholesky(H.to(torch.float64, copy=True), damp)


def spectrum(W: torch.Tensor, L: torch.Tensor | None = None, damp: float = 0.0) -> Spectrum:
    """SVD of W (R, C), or of W L for a whitening factor L (C, C), in float64."""
    A = W.to(torch.float64)
    if L is not None:
        A = A @ L  # (R, C)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return Spectrum(U, S, Vh, L, damp)


def truncate(spec: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors (float64) of the rank-`rank` truncation: left (R, r), right (r, C)."""
    k = spec.S.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ConfigError(f"rank {rank!r} is not valid for a weight of rank at most {k}: use 1 <= rank <= {k}")
    root = spec.S[:rank].sqrt()  # (r,)
    left = spec.U[:, :rank] * root  # (R, r)
    right = root[:, None] * spec.Vh[:rank]  # (r, C)
    if spec.L is not None:  # right L^-1, by triangular solve of X L = right
        right = torch.linalg.solve_triangular(spec.L, right, upper=False, left=False)
    return left, right


def factorise(W: torch.Tensor, rank: int, H: torch.Tensor | None = None,
              damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (R, r), right (r, C)) in W's dtype minimising ||W - left right||_F, or with the input
    Hessian H (C, C) = sum x x^T, ||X (W - left right)^T||_F (H damped by `damp` times its mean diagonal)."""
    L, damp = whiten(H, damp) if H is not None else (None, 0.0)
    left, right = truncate(spectrum(W, L, damp), rank)
    return left.to(W.dtype), right.to(W.dtype)


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest r with sum_{i<r} s_i^2 >= energy * sum_i s_i^2."""
    sq = S.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0:
        return 1
    kept = sq.cumsum(0) / total
    return min(int(torch.searchsorted(kept, torch.tensor([float(energy)], dtype=torch.float64))) + 1, len(S))


def choose_rank(S: torch.Tensor, rows: int, cols: int, cfg: LowRankConfig) -> int:
    """The rank `cfg` asks for, for a (rows, cols) weight with singular values S; in [1, min(rows, cols)]."""
    k = min(rows, cols)
    if cfg.rank is not None:
        return min(cfg.rank, k)
    if cfg.energy is not None:
        return energy_rank(S, cfg.energy)
    return max(1, min(math.floor(cfg.budget * rows * cols / (rows + cols)), k))


# ---------------------------------------------------------------------------------------------
# The pass (module surgery)


@register_pass("lowrank", LowRankConfig, (nn.Linear, nn.Conv2d))
def lowrank(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    for t in targets:  # fail on what cannot work before spending time on SVDs or calibration
        _check_target(t)
    aware = [t for t in targets if t.config.activation_aware]
    if aware and context.calibration is None:
        raise CalibrationError(
            "pass 'lowrank' with activation_aware needs calibration data: call compress(..., "
            "calibration=calibration_sentences(128)) or add --calibration 128 to `modelpress compress` "
            "(or set activation_aware: false)"
        )
    factoriser = _Factoriser(model, context.log)
    with one_thread():  # the decompositions run on one thread, as GPTQ's maths does
        for t in targets:
            if not t.config.activation_aware:
                factoriser.apply(t, spectrum(weight_matrix(t.module)), None, "svd")
    if aware:
        run_blockwise(model, aware, context.calibration, factoriser, context.log, pass_name="lowrank")


def _check_target(t: Target) -> None:
    cfg: LowRankConfig = t.config
    if cfg.activation_aware and not isinstance(t.module, nn.Linear):
        raise ConfigError(f"layer {t.name!r}: activation-aware low-rank needs a Linear layer (calibration captures "
                          "Linear inputs only): set activation_aware: false for conv layers or exclude this one")
    if isinstance(t.module, nn.Conv2d):
        try:
            compressed_twin(t.module, DenseTensor(t.module.weight.detach()))  # a geometry it can run
        except ConfigError as exc:
            raise ConfigError(f"layer {t.name!r}: {exc}") from None
    if not torch.isfinite(t.module.weight).all():
        raise ConfigError(f"layer {t.name!r}: its weight holds NaN or infinity, which has no SVD: "
                          "check the model's weights or exclude this layer")
    cols = weight_matrix(t.module).shape[1]
    group_size = QuantScheme(8, False, cfg.quant.group_size).group_size
    if cfg.quant.bits is not None and group_size > 0 and cols % group_size:  # the right factor's rows are C wide
        raise ConfigError(f"layer {t.name!r}: group size {cfg.quant.group_size} does not divide the input width "
                          f"{cols}: choose a divisor of {cols} (e.g. {math.gcd(cols, 128)}) or exclude this layer")


@dataclass
class _Factoriser:
    """Factorises layers (each group calibration hands over, or one at a time) and swaps them in."""

    model: nn.Module
    log: list[str]

    def __call__(self, group: list) -> None:
        whitening: dict[tuple[int, float], tuple[torch.Tensor, float]] = {}  # layers of a group share H
        with one_thread():  # calibration forwards, outside this call, keep the caller's threads
            for target, stats in group:
                key = (id(stats), target.config.damp)
                if key not in whitening:
                    whitening[key] = whiten(stats.hessian, target.config.damp)
                L, damp = whitening[key]
                self.apply(target, spectrum(weight_matrix(target.module), L, damp), stats.hessian,
                           f"activation-aware, {stats.tokens} tokens")

    def apply(self, target: Target, spec: Spectrum, H: torch.Tensor | None, method: str) -> None:
        cfg: LowRankConfig = target.config
        layer = target.module
        W = weight_matrix(layer)  # (R, C)
        rows, cols = W.shape
        rank = choose_rank(spec.S, rows, cols, cfg)
        left, right = (f.float() for f in truncate(spec, rank))
        enc = LowRankTensor(_encode(left, cfg), _encode(right, cfg), tuple(layer.weight.shape))
        original = layer.weight.numel() * layer.weight.element_size()
        notes = [method] + ([f"damp raised to {spec.damp:g}"] if spec.L is not None and spec.damp != cfg.damp else [])
        notes.append(_describe_factors(enc))
        error = _relative_error(W, enc.decode().reshape(rows, cols), H)
        metric = "output" if H is not None else "weight"
        summary = (f"rank {rank} of {min(rows, cols)} ({'; '.join(notes)}), {enc.nbytes} bytes vs {original} "
                   f"({enc.nbytes / original:.1%}), relative {metric} error {error:.2e}")
        if enc.nbytes >= original and cfg.skip_if_larger:
            self.log.append(f"{target.name}: left unchanged by lowrank: its factors would not be smaller ({summary}); "
                            "lower the rank, or set skip_if_larger: false to factorise anyway")
            return
        install(self.model, target.name, enc, cfg.kernel)
        self.log.append(f"{target.name}: lowrank {summary}")


def _encode(factor: torch.Tensor, cfg: LowRankConfig) -> Encoding:
    scheme = cfg.scheme(factor.shape[1])
    return DenseTensor(factor.contiguous()) if scheme is None else quantize_weight(factor, scheme, cfg.quant.search)


def _describe_factors(enc: LowRankTensor) -> str:
    parts = []
    for name in ("left", "right"):
        factor = getattr(enc, name)
        parts.append(f"{name} {factor.scheme.describe()}" if hasattr(factor, "scheme") else f"{name} fp32")
    return ", ".join(parts)


def _relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> float:
    """||W - W_hat||_F / ||W||_F, or in the output metric of H: sqrt(tr(D H D^T) / tr(W H W^T))."""
    D, W = (W - W_hat).double(), W.double()
    if H is None:
        return float(D.norm() / W.norm().clamp_min(1e-30))
    H = H.double()
    return math.sqrt(float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-30)))
