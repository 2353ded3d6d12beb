"""An exact allocation of per-layer options under a byte budget: the multiple-choice knapsack, solved by
dynamic programming over discretised bytes.

Each layer takes exactly one of its options (bytes b, estimated damage d); the sum of the chosen
damages is minimised subject to the sum of the chosen bytes fitting the budget. Bytes are measured in
units of `unit` bytes and every option's cost is rounded UP to whole units, so an allocation the
program finds always fits the real budget; the program is exact for the rounded costs (and for the
real ones when every cost is a multiple of `unit`: the tests check it against brute force). One pass
gives the optimum for every budget up to the limit, which is the estimated Pareto front
(`estimated_front`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from modelpress.errors import ConfigError

__all__ = ["pinned_allocations", "Allocation", "Knapsack", "DEFAULT_RESOLUTION", "solve_knapsack"]

DEFAULT_RESOLUTION = 4096  # budget units: a rounding of at most 1/4096 of the budget per layer


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]  # option index per layer
    bytes: int  # exact bytes of the chosen options
    damage: float  # sum of the chosen options' damages


class Knapsack:
    """The solved program: `best(budget_bytes)` for any budget up to the limit it was solved for."""

    def __init__(self, costs: Sequence[Sequence[int]], damages: Sequence[Sequence[float]], limit: int,
                 resolution: int = DEFAULT_RESOLUTION, unit: int | None = None):
        if len(costs) != len(damages) or not costs:
            raise ConfigError("the knapsack needs the same layers in costs and damages, at least one")
        if any(len(c) != len(d) or not c for c, d in zip(costs, damages)):
            raise ConfigError("every layer needs at least one option, with a cost and a damage each")
        if any(not math.isfinite(x) for d in damages for x in d):
            raise ConfigError("an option's damage is not finite: measure it again (a NaN means a broken layer)")
        self.costs = [list(map(int, c)) for c in costs]
        self.damages = [list(map(float, d)) for d in damages]
        self.limit = int(limit)
        self.unit = unit or max(1, math.ceil(self.limit / resolution))
        self.units = self.limit // self.unit
        self._solve()

    def _solve(self) -> None:
        n_units = self.units + 1
        inf = np.inf
        best = np.zeros(n_units)  # best[c]: least damage of the layers so far within c units
        self.back: list[np.ndarray] = []
        for costs, damages in zip(self.costs, self.damages):
            new = np.full(n_units, inf)
            arg = np.full(n_units, -1, dtype=np.int32)
            for k, (cost, damage) in enumerate(zip(costs, damages)):
                w = -(-cost // self.unit)  # rounded up
                if w >= n_units:
                    continue
                shifted = np.full(n_units, inf)
                shifted[w:] = best[: n_units - w] + damage
                better = shifted < new  # ties keep the earlier option
                new[better], arg[better] = shifted[better], k
            best = new
            self.back.append(arg)
        self.best = best  # least total damage within c units, inf where nothing fits

    def best_within(self, budget_bytes: int) -> Allocation | None:
        """The least-damage allocation whose (rounded) bytes fit `budget_bytes`, or None if none fits."""
        c = min(self.units, int(budget_bytes) // self.unit)
        if c < 0 or not math.isfinite(self.best[c]):
            return None
        choice = []
        for layer in range(len(self.costs) - 1, -1, -1):
            k = int(self.back[layer][c])
            choice.append(k)
            c -= -(-self.costs[layer][k] // self.unit)
        choice.reverse()
        return Allocation(tuple(choice), sum(self.costs[i][k] for i, k in enumerate(choice)),
                          sum(self.damages[i][k] for i, k in enumerate(choice)))

    def estimated_front(self, points: int = 64) -> list[Allocation]:
        """Distinct optimal allocations at `points` budgets spread from the smallest feasible one to the
        limit, each strictly less damaged than the smaller ones (an estimated Pareto front)."""
        feasible = np.flatnonzero(np.isfinite(self.best))
        if feasible.size == 0:
            return []
        lo = int(feasible[0])
        out: list[Allocation] = []
        for c in np.unique(np.linspace(lo, self.units, max(points, 2)).round().astype(int)):
            found = self.best_within(int(c) * self.unit)
            if found is not None and (not out or found.damage < out[-1].damage - 1e-15) and \
                    all(found.choice != a.choice for a in out):
                out.append(found)
        return out


def pinned_allocations(costs: Sequence[Sequence[int]], damages: Sequence[Sequence[float]], limit: int,
                       layer: int, resolution: int = DEFAULT_RESOLUTION) -> list[Allocation]:
    """For each option of `layer`: the least-damage allocation within `limit` that takes that option (those
    that fit), as indices into the full option lists."""
    out = []
    for k in range(len(costs[layer])):
        pinned_costs = [list(c) if i != layer else [c[k]] for i, c in enumerate(costs)]
        pinned_damages = [list(d) if i != layer else [d[k]] for i, d in enumerate(damages)]
        found = Knapsack(pinned_costs, pinned_damages, limit, resolution).best_within(limit)
        if found is not None:
            choice = tuple(k if i == layer else j for i, j in enumerate(found.choice))
            out.append(Allocation(choice, found.bytes, found.damage))
    return out


def solve_knapsack(costs: Sequence[Sequence[int]], damages: Sequence[Sequence[float]], budget_bytes: int,
                   resolution: int = DEFAULT_RESOLUTION) -> Allocation:
    """The least-damage allocation within `budget_bytes` (see the module docstring)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ConfigError(f"budget of {budget_bytes!r} bytes is not valid: give a positive integer")
    found = Knapsack(costs, damages, budget_bytes, resolution).best_within(budget_bytes)
    if found is None:
        least = sum(min(c) for c in costs)
        raise ConfigError(f"no allocation fits {budget_bytes:,} bytes: the smallest options need {least:,}; "
                          "raise the budget or add smaller options")
    return found
