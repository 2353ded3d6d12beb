"""`compress(model, recipe)`: the one entry verb that applies a recipe's passes to a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from modelpress.errors import RecipeError
from modelpress.passes.base import PassContext, pass_for
from modelpress.presets import PRESETS, preset
from modelpress.recipe import Recipe

__all__ = ["compress", "resolve_recipe"]


def resolve_recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    """A Recipe from a Recipe, a preset name, a YAML file path, or a plain dict."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    if text in PRESETS:
        return preset(text)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist: give a preset {sorted(PRESETS)} or a YAML path")
        return Recipe.from_file(path)
    raise RecipeError(f"unknown preset {text!r}: use one of {sorted(PRESETS)} or a recipe YAML file")


def compress(
    model: nn.Module,
    recipe: Recipe | str | Path | dict,
    calibration: Any = None,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Apply `recipe` to `model` in place and return it.

    Each module is rewritten by at most one stage, plus any later stages of refining passes (which
    may rewrite what an earlier stage produced, e.g. cluster the kept values of a pruned layer).
    """
    recipe = resolve_recipe(recipe)
    context = PassContext(calibration=calibration)
    taken: set[str] = set()
    for index, stage in enumerate(recipe.stages):
        targets = stage.resolve(model, taken)
        if not targets and stage.optional:
            continue
        if not targets:
            raise RecipeError(
                f"stage {index} ({stage.pass_name}) matched no module: check its targets "
                f"(module names look like {_example_names(model)})"
            )
        if progress:
            progress(f"stage {index}: {stage.pass_name} on {len(targets)} modules")
        pass_for(stage.pass_name).fn(model, targets, context)
        taken.update(t.name for t in targets)
    model.modelpress_recipe = recipe  # what save() records next to the weights
    model.modelpress_log = context.log
    return model


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if n and not list(m.children())][:3]
    return ", ".join(repr(n) for n in names) or "(the model has no submodules)"
