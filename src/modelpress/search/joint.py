"""The joint search: per-layer options measured alone, an exact allocation under a budget, candidates
validated end to end, the Pareto front and the chosen recipe, all kept in a run folder.

1. `table.measure_table`: every option of the space on every searchable layer, alone in the float
   model (damage, exact bytes, latency of the kernel it chose); keeping a layer in float is an option.
2. `allocate.Knapsack`: the least summed damage within every byte budget up to the limit (a multiple-
   choice knapsack by dynamic programming). Single-layer damages do not add up exactly, so:
3. the allocation at the budget, the best ones at budgets a little under it (a quarter of `candidates`), the
   best ones at the budget with each option of the row whose options differ most in bytes pinned (up to a
   quarter: see `_pinned`), and the rest spread over the estimated front are written as recipes and
   validated end to end by an executor (worker processes by default);
4. the front is the validated candidates no other one beats in bytes, fidelity and latency together; the
   chosen recipe is the best-fidelity candidate whose bytes as stored fit the budget.

The budget is the whole model's bytes as stored (`size_report`: encodings at their size, every other
tensor as held), or bits per weight of the searched layers. Latency is the cost model's: the sum of the
chosen options' timed layers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from modelpress.errors import ConfigError
from modelpress.evaluate.size import size_report
from modelpress.recipe import Recipe
from modelpress.search.allocate import Knapsack, pinned_allocations
from modelpress.search.runfolder import RunFolder
from modelpress.search.space import Option, allocation_recipe
from modelpress.search.table import OptionTable, make_runner, measure_table, searchable_layers

__all__ = ["Budget", "SearchResult", "joint_search", "pareto_front"]

Progress = Callable[[str, int, int], None]  # (step, done, total)
NEAR_STEP = 0.004  # near-budget candidates: the best allocations at 0.4%, 0.8%, ... under the budget


@dataclass(frozen=True)
class Budget:
    """The whole model's bytes as stored, or bits per weight of the searched layers: exactly one."""

    total_bytes: int | None = None
    bits_per_weight: float | None = None

    def layer_bytes(self, fixed_bytes: int, params: int) -> int:
        if (self.total_bytes is None) == (self.bits_per_weight is None):
            raise ConfigError("give exactly one budget: --budget-mb or --bits-per-weight")
        if self.bits_per_weight is not None:
            if not 0 < self.bits_per_weight < 64:
                raise ConfigError(f"{self.bits_per_weight} bits per weight is not a budget: give a number in (0, 64)")
            return math.floor(self.bits_per_weight * params / 8)
        room = self.total_bytes - fixed_bytes
        if room <= 0:
            raise ConfigError(f"the budget of {self.total_bytes:,} bytes is below what the model keeps unsearched "
                              f"({fixed_bytes:,} bytes): raise the budget")
        return room


@dataclass
class SearchResult:
    data: dict[str, Any]  # what search.json holds
    chosen: Recipe | None
    evaluations: int = 0  # candidates validated by this call (not taken from the run folder)
    measured_options: int = 0  # options measured by this call
    table: OptionTable | None = field(default=None, repr=False)


def pareto_front(points: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[int]:
    """Indices of the points no other point matches or beats in every key (all minimised) and beats in one."""
    out = []
    for i, p in enumerate(points):
        dominated = any(all(q[k] <= p[k] for k in keys) and any(q[k] < p[k] for k in keys)
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return out


def _digest(inputs: Any) -> str:
    digest = hashlib.sha256()
    if inputs is None:
        return "none"
    for item in [inputs] if isinstance(inputs, torch.Tensor) else inputs:
        if isinstance(item, torch.Tensor):
            digest.update(str(tuple(item.shape)).encode() + item.contiguous().numpy().tobytes())
        else:
            digest.update(str(item).encode() + b"\0")
    return digest.hexdigest()


def _spec(model_name: str, causal: bool, inputs: Any, sensitivity_inputs: Any, calibration: Any,
          sensitivity_calibration: Any, seed: int, include: Sequence[str], ignore: Sequence[str],
          groups: Sequence[str]) -> dict[str, Any]:
    """What the measurements and validations depend on (run.json): a run folder holds one of these. The space,
    the budget and the number of candidates are not in it: a run resumed with another budget or a subset of
    the space reuses every option measured and every candidate validated."""
    return {"model": model_name, "metric": "ppl" if causal else "cos", "inputs_sha256": _digest(inputs),
            "n_inputs": len(inputs), "sensitivity_sha256": _digest(sensitivity_inputs),
            "calibration_sha256": _digest(calibration),
            "sensitivity_calibration_sha256": _digest(sensitivity_calibration), "seed": seed, "include": list(include),
            "ignore": list(ignore), "groups": list(groups)}


def _request(options: Sequence[Option], budget: Budget, candidates: int) -> dict[str, Any]:
    return {"space": [o.to_dict() for o in options], "budget_bytes": budget.total_bytes,
            "budget_bits_per_weight": budget.bits_per_weight, "candidates": candidates}


def joint_search(model: nn.Module, model_name: str, inputs: Any, options: Sequence[Option], budget: Budget,
                 run_dir: str, executor_factory: Callable[[], Any], causal: bool = False,
                 calibration: Any = None, candidates: int = 12, seed: int = 0, include: Sequence[str] = ("*",),
                 ignore: Sequence[str] = (), progress: Progress | None = None,
                 sensitivity_inputs: Any = None, sensitivity_calibration: Any = None,
                 groups: Sequence[str] = ()) -> SearchResult:
    """Search `model` (see the module docstring); `inputs` are the held-out sentences or token windows the
    candidates are validated on, `sensitivity_inputs` those the per-layer table is measured on (default:
    the same). `calibration` calibrates data-aware options (GPTQ) in the candidates, `sensitivity_calibration`
    in the table (default: the same; a smaller set makes the table's GPTQ runs cheaper, and the table is an
    estimate that the validation corrects). `groups`: name patterns whose layers are searched as one row each
    (`table.searchable_layers`). `executor_factory()` gives the executor (`validate.make_executor`)."""
    if candidates < 2:
        raise ConfigError(f"--candidates {candidates} is too few: validate at least 2 (e.g. 12)")
    torch.manual_seed(seed)
    folder = RunFolder(run_dir)
    sensitivity_inputs = inputs if sensitivity_inputs is None else sensitivity_inputs
    sensitivity_calibration = calibration if sensitivity_calibration is None else sensitivity_calibration
    folder.start(_spec(model_name, causal, inputs, sensitivity_inputs, calibration, sensitivity_calibration, seed,
                       include, ignore, groups))
    model.eval()
    layers = searchable_layers(model, options, include, ignore, groups)
    params = sum(i.params for i in layers)
    fixed = size_report(model).bytes - sum(i.float_bytes for i in layers)
    limit = budget.layer_bytes(fixed, params)

    done = folder.load_options(options)
    measured = [0]

    by_label = {o.label: o for o in options}

    def on_option(label, cells):
        folder.save_option(by_label[label], cells)
        measured[0] += 1

    step = [0]

    def advance(label):
        step[0] += 1
        if progress:
            progress(f"measuring {label}", step[0], len(options))

    runner = make_runner(model, sensitivity_inputs, causal)
    table = measure_table(model, layers, options, runner, causal, sensitivity_calibration, done, on_option, advance)
    del runner

    choices = [table.choices(i.name) for i in layers]
    knap = Knapsack([[c.bytes for _, c in ch] for ch in choices], [[c.damage for _, c in ch] for ch in choices],
                    limit)
    if knap.best_within(limit) is None:
        least = fixed + sum(min(c.bytes for _, c in ch) for ch in choices)
        raise ConfigError(f"no allocation fits the budget: the smallest options make the model {least:,} bytes; "
                          "raise the budget or add smaller options to the space")
    at_budget = knap.best_within(limit)
    # Close to the budget the estimate decides the choice, and it is only an estimate: the best allocations at
    # budgets a little under it are validated too (a quarter of the candidates), the rest spread over the front.
    near: list = []
    for k in range(1, 4 * candidates):
        if len(near) >= candidates // 4:
            break
        found = knap.best_within(int(limit * (1 - NEAR_STEP * k)))
        if found is not None and all(found.choice != a.choice for a in [at_budget, *near]):
            near.append(found)
    pinned = _pinned(choices, limit, [at_budget, *near], candidates // 4)
    estimated = [a for a in knap.estimated_front(points=max(64, 4 * candidates))
                 if all(a.choice != b.choice for b in [at_budget, *near, *pinned])]
    picked = _spread(estimated, candidates - 1 - len(near) - len(pinned)) + pinned + near + [at_budget]
    recipes: dict[str, tuple[Recipe, Any]] = {}
    for alloc in picked:
        choice = {name: by_label[choices[i][k][0]] for i, k in enumerate(alloc.choice)
                  if choices[i][k][0] != "float" for name in layers[i].names}
        if not choice:
            continue
        recipe = allocation_recipe(choice, name=f"{model_name}-searched")
        cid = folder.save_candidate(recipe)
        recipes[cid] = (recipe, alloc)

    todo = [(cid, r.to_dict()) for cid, (r, _) in recipes.items() if folder.figures(cid) is None]
    count = [0]

    def on_result(cid, figures):
        folder.save_figures(cid, figures)
        count[0] += 1
        if progress:
            progress("validating candidates", count[0], len(todo))

    if todo:
        executor = executor_factory()
        try:
            executor.run(todo, on_result)
        finally:
            executor.close()
    data = _result(folder, table, layers, choices, recipes, fixed, limit, budget, causal)
    data["run"]["spec"] = {**data["run"]["spec"], **_request(options, budget, candidates)}
    chosen = folder.candidate_recipe(data["chosen"]) if data["chosen"] else None
    folder.save_result(data, chosen)
    return SearchResult(data, chosen, count[0], measured[0], table)


def _pinned(choices, limit: int, taken: list, most: int) -> list:
    """The row whose options differ most in bytes (a tied embedding/output table, say) is where summed single-row
    damages mislead most: its error reaches every later layer and, tied, the logits, while the knapsack weighs
    it as one row's. So the best allocation at the budget with each of its other options pinned is validated
    too (up to `most`), and end-to-end figures, not the estimate, decide that row."""
    if most < 1 or not choices:
        return []
    spreads = [max(c.bytes for _, c in ch) - min(c.bytes for _, c in ch) for ch in choices]
    row = int(np.argmax(spreads))
    costs = [[c.bytes for _, c in ch] for ch in choices]
    damages = [[c.damage for _, c in ch] for ch in choices]
    out: list = []
    for alloc in sorted(pinned_allocations(costs, damages, limit, row), key=lambda a: a.damage):
        if len(out) < most and all(alloc.choice != b.choice for b in [*taken, *out]):
            out.append(alloc)
    return out


def _spread(front: list, n: int) -> list:
    """`n` allocations spread evenly (by index) over the estimated front, the smallest and largest among them."""
    if len(front) <= n:
        return list(front)
    return [front[i] for i in np.unique(np.linspace(0, len(front) - 1, n).round().astype(int))]


def _result(folder: RunFolder, table: OptionTable, layers, choices, recipes, fixed: int, limit: int,
            budget: Budget, causal: bool) -> dict[str, Any]:
    quality = "kl" if causal else "loss"
    points = []
    for cid, (recipe, alloc) in recipes.items():
        figures = folder.figures(cid)
        picks = {layers[i].name: choices[i][k][0] for i, k in enumerate(alloc.choice)}
        latency = sum(choices[i][k][1].latency_s for i, k in enumerate(alloc.choice))
        point = {"id": cid, "predicted_bytes": fixed + alloc.bytes, "estimated_damage": alloc.damage,
                 "latency_s": latency, "choice": picks, **figures}
        point["loss"] = point["kl"] if causal else 1.0 - point["mean_cosine"]
        points.append(point)
    points.sort(key=lambda p: (p["bytes"], p["loss"], p["id"]))
    for i in pareto_front(points, ("bytes", quality if causal else "loss", "latency_s")):
        points[i]["front"] = True
    for i in pareto_front(points, ("bytes", "loss")):
        points[i]["front_size_fidelity"] = True
    limit_total = fixed + limit
    fitting = [p for p in points if p["bytes"] <= limit_total]
    chosen = min(fitting, key=lambda p: (p["loss"], p["bytes"], p["id"]))["id"] if fitting else None
    return {
        "metric": "ppl" if causal else "cos",
        "budget_bytes": limit_total,
        "budget_bits_per_weight": budget.bits_per_weight,
        "fixed_bytes": fixed,
        "layers": [{"name": i.name, "kind": i.kind, "shape": list(i.shape), "params": i.params,
                    "float_bytes": i.float_bytes, **({"members": list(i.members)} if i.members else {})}
                   for i in layers],
        "options": [o.to_dict() for o in table.options],
        "table": {label: {k: c.to_dict() for k, c in cells.items()} for label, cells in table.cells.items()},
        "float_cells": {k: c.to_dict() for k, c in table.float_cells.items()},
        "candidates": points,
        "chosen": chosen,
        "run": folder.run_info(),
    }
