"""Mixed precision from sensitivity: spend a size budget where it buys the most.

`mixed_precision_recipe` spends a size budget (bits per weight, or bytes, of the selected
layers' weights as stored) where it buys the most: starting from the recipe, it repeatedly takes
the measured upgrade (more bits, smaller groups) with the largest damage removed per extra byte
that still fits. Damage is 1 - mean cosine of the layer alone; summing it over layers is a first-
order estimate (small, independent errors add), which is what a greedy plan needs, not a promise.
The result is an ordinary Recipe: the chosen upgrades are per-layer `overrides`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from modelpress.encodings.packing import SUPPORTED_BITS
from modelpress.errors import ConfigError
from modelpress.recipe import Recipe, Stage
from modelpress.search.overrides import with_overrides
from modelpress.search.sensitivity import LayerSensitivity, Measurement, as_recipe

__all__ = ["MixedPrecisionPlan", "default_upgrades", "mixed_precision_recipe", "plan_mixed_precision"]


def default_upgrades(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Halved groups, then the next supported bit width (8 bits per channel); [] for passes without bits."""
    bits, group = config.get("bits"), config.get("group_size")
    if not isinstance(bits, int) or group is None:
        return []
    upgrades = []
    if isinstance(group, int) and not isinstance(group, bool) and group >= 32 and group % 2 == 0:
        upgrades.append({"group_size": group // 2})
    wider = [b for b in SUPPORTED_BITS if b > bits]
    if wider:
        upgrades.append({"bits": wider[0], **({"group_size": "channel"} if wider[0] == 8 else {})})
    return upgrades


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """The upgrades chosen for a budget, with the size and estimated damage they lead to."""

    choices: tuple[tuple[LayerSensitivity, Measurement], ...]  # every layer, with the option chosen for it
    budget_bytes: int

    @property
    def params(self) -> int:
        return sum(r.params for r, _ in self.choices)

    @property
    def bytes(self) -> int:
        return sum(m.bytes for _, m in self.choices)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / max(self.params, 1)

    @property
    def damage(self) -> float:
        """Sum of the chosen options' single-layer damages: a first-order estimate of the whole."""
        return sum(m.damage for _, m in self.choices)

    @property
    def upgraded(self) -> dict[str, dict[str, Any]]:
        """Layer name -> the config changes chosen for it (layers kept as the recipe says are left out)."""
        return {r.name: m.changes for r, m in self.choices if m is not r.base}


def plan_mixed_precision(
    rows: Sequence[LayerSensitivity], budget_bits: float | None = None, budget_bytes: int | None = None
) -> MixedPrecisionPlan:
    """Greedy: repeatedly take the upgrade with the most damage removed per extra byte that fits the budget.

    The budget covers the weights of the rows' layers as stored (codes, scales, zeros): give it in
    bits per weight or in bytes, not both. An option that is both smaller and less damaged than
    the current one is always taken first.
    """
    limit = _budget_bytes(rows, budget_bits, budget_bytes)
    choice = {r.name: r.base for r in rows}
    total = sum(m.bytes for m in choice.values())
    if total > limit:
        raise ConfigError(
            f"the recipe alone needs {8.0 * total / sum(r.params for r in rows):.3f} bits per weight "
            f"({total:,} bytes), over the budget of {8.0 * limit / sum(r.params for r in rows):.3f}: "
            "raise the budget or start from a recipe with fewer bits"
        )
    while (step := _best_step(rows, choice, limit - total)) is not None:
        row, option = step
        total += option.bytes - choice[row.name].bytes
        choice[row.name] = option
    return MixedPrecisionPlan(tuple((r, choice[r.name]) for r in rows), limit)


def _budget_bytes(rows: Sequence[LayerSensitivity], budget_bits: float | None, budget_bytes: int | None) -> int:
    if not rows:
        raise ConfigError("no sensitivity rows to plan with: run layer_sensitivity first")
    if len({r.name for r in rows}) != len(rows):
        raise ConfigError("sensitivity rows name a layer twice: give the rows of one layer_sensitivity run")
    if (budget_bits is None) == (budget_bytes is None):
        raise ConfigError("give exactly one budget: budget_bits (bits per weight) or budget_bytes")
    if budget_bits is not None:
        if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, float)) or not 0 < budget_bits < 64:
            raise ConfigError(f"budget of {budget_bits!r} bits per weight is not valid: "
                              "give a number in (0, 64), e.g. 5")
        return math.floor(budget_bits * sum(r.params for r in rows) / 8)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ConfigError(f"budget of {budget_bytes!r} bytes is not valid: give a positive integer")
    return budget_bytes


def _best_step(rows: Sequence[LayerSensitivity], choice: dict[str, Measurement], room: int):
    """The (row, option) with the largest damage removed per extra byte that fits in `room`, or None."""
    best, best_ratio = None, 0.0
    for row in rows:
        current = choice[row.name]
        for option in (row.base, *row.upgrades):
            gain, extra = current.damage - option.damage, option.bytes - current.bytes
            if gain <= 0 or extra > room:
                continue
            ratio = math.inf if extra <= 0 else gain / extra
            if best is None or ratio > best_ratio:
                best, best_ratio = (row, option), ratio
    return best


def mixed_precision_recipe(
    rows: Sequence[LayerSensitivity],
    recipe: Recipe | Stage | str | dict,
    budget_bits: float | None = None,
    budget_bytes: int | None = None,
    name: str | None = None,
) -> Recipe:
    """`recipe` (the one `rows` were measured with) plus per-layer overrides that fit the budget."""
    recipe = as_recipe(recipe)
    for row in rows:
        if not 0 <= row.stage < len(recipe.stages):
            raise ConfigError(f"row {row.name!r} comes from stage {row.stage}, but the recipe has "
                              f"{len(recipe.stages)}: plan with the recipe the rows were measured with")
    plan = plan_mixed_precision(rows, budget_bits, budget_bytes)
    stage_of = {r.name: r.stage for r in rows}
    groups = frozenset(r.name for r in rows if r.group)
    mixed = with_overrides(recipe, {name: (stage_of[name], c) for name, c in plan.upgraded.items()}, groups)
    return Recipe(mixed.stages, name=name or f"{recipe.name}-mixed")
