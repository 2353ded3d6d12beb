"""`compress(model, what)`: the one entry verb that applies a recipe's passes to a model.

`what` is a pass config (`GPTQConfig(bits=4, group_size=64)`), an ordered map of module-name
patterns to configs (`{"*.pooler.*": None, "*": RTNConfig(bits=8)}`), a Recipe, a preset name,
a recipe YAML path, or a recipe as plain data.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from modelpress.errors import RecipeError
from modelpress.nn.provenance import record_provenance
from modelpress.nn.registry import is_compressed
from modelpress.passes.base import PassContext, pass_for
from modelpress.passes.config import PassConfig
from modelpress.presets import preset, preset_names
from modelpress.recipe import Recipe, is_pattern_map

__all__ = ["compress", "resolve_recipe"]

What = Recipe | PassConfig | Mapping[str, PassConfig | None] | str | Path | dict


def resolve_recipe(what: What) -> Recipe:
    """A Recipe from a Recipe, a pass config, a {pattern: config} map, a preset name, a YAML path or plain data."""
    if isinstance(what, Recipe):
        return what
    if isinstance(what, PassConfig) or is_pattern_map(what):
        return Recipe.from_configs(what)
    if isinstance(what, dict):
        return Recipe.from_dict(what)
    text = str(what)
    if text in preset_names():
        return preset(text)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist: give a preset {sorted(preset_names())} "
                              "or a YAML path")
        return Recipe.from_file(path)
    raise RecipeError(f"unknown preset {text!r}: use one of {sorted(preset_names())} or a recipe YAML file")


def compress(
    model: nn.Module,
    what: What,
    calibration: Any = None,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Apply `what` (a config, a {pattern: config} map or a recipe, see the module docstring) to `model`
    in place and return it.

    Each module is rewritten by at most one stage, plus any later stages of refining passes (which
    may rewrite what an earlier stage produced, e.g. cluster the kept values of a pruned layer).
    The recipe and a log line per rewritten module are kept with the model (`provenance(model)`)
    and saved with it.
    """
    if is_pattern_map(what):
        _check_patterns(model, what)
    recipe = resolve_recipe(what)
    context = PassContext(calibration=calibration)
    taken: set[str] = set()
    for index, stage in enumerate(recipe.stages):
        targets = stage.resolve(model, taken)
        if not targets and stage.optional:
            continue
        if not targets:
            raise RecipeError(
                f"stage {index} ({stage.pass_name}) matched no module: check its targets "
                f"(module names look like {_example_names(model)}){_already_compressed(model)}"
            )
        if progress:
            progress(f"stage {index}: {stage.pass_name} on {len(targets)} modules")
        pass_for(stage.pass_name).fn(model, targets, context)
        taken.update(t.name for t in targets)
    record_provenance(model, recipe.to_dict(), context.log)  # what save() records next to the weights
    return model


def _check_patterns(model: nn.Module, patterns: Mapping[str, Any]) -> None:
    """Every pattern of a map must match a module name: a typo must not silently skip or compress nothing."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise RecipeError(f"pattern {pattern!r} matches no module name (they look like {_example_names(model)})")


def _already_compressed(model: nn.Module) -> str:
    """A hint for a model whose layers a stage cannot take because they are compressed already."""
    count = sum(1 for m in model.modules() if is_compressed(m))
    return (f"; {count} modules are compressed already (a GPTQ folder or a checkpoint loads that way) and stages "
            "rewrite float layers only" if count else "")


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if n and not list(m.children())][:3]
    return ", ".join(repr(n) for n in names) or "(the model has no submodules)"
