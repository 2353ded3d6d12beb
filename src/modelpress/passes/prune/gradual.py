"""Gradual pruning during training: masks that tighten on the cubic schedule of Zhu & Gupta (2017),
ranked by magnitude, first-order Taylor (|w * dL/dw|) or movement (-w * dL/dw) importance."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from modelpress.encodings import as_matrix
from modelpress.encodings.sparse import sparsify
from modelpress.errors import ConfigError
from modelpress.nn import install
from modelpress.passes.config import PassConfig, enum_value, pass_config
from modelpress.passes.prune.config import Scope, check_fraction
from modelpress.passes.prune.masks import global_masks, topk_mask

__all__ = ["GradualConfig", "GradualPruner", "Importance", "cubic_sparsity"]


class Importance(str, Enum):
    MAGNITUDE = "magnitude"  # |w|
    TAYLOR = "taylor"  # running mean of |w * dL/dw| (first-order Taylor estimate of the loss change)
    MOVEMENT = "movement"  # accumulated -w * dL/dw: weights moving away from zero are kept (Sanh et al. 2020)


def cubic_sparsity(step: int, final: float, initial: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3, held outside [t0, t_end]."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


@pass_config
class GradualConfig(PassConfig):
    """Raise sparsity from `initial_sparsity` to `final_sparsity` between two training steps."""

    final_sparsity: float = 0.9
    end_step: int = 1000  # the step at which the final sparsity is reached
    initial_sparsity: float = 0.0
    start_step: int = 0
    every: int = 10  # recompute masks every this many steps (Zhu & Gupta's delta t)
    importance: Importance = Importance.MAGNITUDE
    scope: Scope = Scope.GLOBAL  # layer or global (row keeps each output row equally sparse)
    taylor_decay: float = 0.9  # running-mean factor of the Taylor scores

    def validate(self) -> None:
        object.__setattr__(self, "importance", enum_value(Importance, self.importance, "importance"))
        object.__setattr__(self, "scope", enum_value(Scope, self.scope, "scope"))
        check_fraction(self.final_sparsity, "final_sparsity")
        check_fraction(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError(f"initial_sparsity {self.initial_sparsity} exceeds final_sparsity {self.final_sparsity}")
        for name in ("start_step", "end_step", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "every" else 0):
                raise ConfigError(f"{name} {value!r} is not valid: give a {'positive' if name == 'every' else 'non-negative'} integer")
        if self.end_step <= self.start_step:
            raise ConfigError(f"end_step {self.end_step} must come after start_step {self.start_step}")
        if not 0 <= self.taylor_decay < 1:
            raise ConfigError(f"taylor_decay {self.taylor_decay!r} is not valid: give a fraction in [0, 1)")


class GradualPruner:
    """Masks that tighten on a cubic schedule while the model trains.

        pruner = GradualPruner(model, GradualConfig(final_sparsity=0.9, end_step=steps))
        for step in range(total):
            loss.backward(); pruner.observe(); optimizer.step(); pruner.step(step)
        pruner.finalize()  # Linear/Conv2d -> compressed modules holding SparseTensor weights

    Masks only grow: a pruned weight stays pruned (and zero) for the rest of training.
    """

    def __init__(self, model: nn.Module, config: GradualConfig, names: list[str] | None = None):
        self.model, self.config = model, config
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        if names is not None:
            unknown = sorted(set(names) - set(layers))
            if unknown:
                raise ConfigError(f"cannot prune {unknown}: only Linear and Conv2d layers are pruned gradually")
            layers = {n: layers[n] for n in names}
        if not layers:
            raise ConfigError("the model has no Linear or Conv2d layer to prune")
        self.layers = layers
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
        self.scores = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
        self.sparsity = 0.0

    def observe(self) -> None:
        """After backward: accumulate Taylor / movement scores from the current gradients."""
        c = self.config
        if c.importance is Importance.MAGNITUDE:
            return
        for n, m in self.layers.items():
            if m.weight.grad is None:
                continue
            wg = (m.weight.detach() * m.weight.grad.detach())
            if c.importance is Importance.TAYLOR:
                self.scores[n].mul_(c.taylor_decay).add_(wg.abs(), alpha=1 - c.taylor_decay)
            else:
                self.scores[n].sub_(wg)

    def _importance(self, name: str) -> torch.Tensor:
        m = self.layers[name]
        if self.config.importance is Importance.MAGNITUDE:
            return m.weight.detach().abs()
        return self.scores[name].clone()

    @torch.no_grad()
    def step(self, step: int) -> None:
        """After the optimiser step: tighten the masks when the schedule says so, and apply them."""
        c = self.config
        if step % c.every == 0 or step == c.end_step:
            target = cubic_sparsity(step, c.final_sparsity, c.initial_sparsity, c.start_step, c.end_step)
            if target > self.sparsity:
                self._update_masks(target)
                self.sparsity = target
        for n, m in self.layers.items():
            m.weight.mul_(self.masks[n])

    def _update_masks(self, sparsity: float) -> None:
        # pruned weights score -inf, so they stay pruned (masks only grow)
        scores = {n: torch.where(self.masks[n], self._importance(n), float("-inf")) for n in self.layers}
        if self.config.scope is Scope.GLOBAL:
            kept = global_masks([as_matrix(s) for s in scores.values()], sparsity)
            for n, k in zip(scores, kept):
                self.masks[n] = k.reshape(self.masks[n].shape)
            return
        for n, s in scores.items():
            self.masks[n] = topk_mask(as_matrix(s), sparsity, self.config.scope is Scope.ROW).reshape(s.shape)

    def finalize(self) -> nn.Module:
        """Replace every pruned layer by its compressed twin with a SparseTensor weight."""
        for n, m in self.layers.items():
            install(self.model, n, sparsify(m.weight.detach().float(), self.masks[n]))
        return self.model
