"""Recipes with per-layer config changes: one exact-name override per changed layer (or one pattern per
changed group of layers)."""

from __future__ import annotations

import dataclasses
from typing import Any

from modelpress.passes.config import config_to_dict
from modelpress.recipe import Recipe, Stage

__all__ = ["exact_pattern", "with_override", "with_overrides"]


def with_overrides(recipe: Recipe, layer_changes: dict[str, tuple[int, dict[str, Any]]],
                   patterns: frozenset[str] = frozenset()) -> Recipe:
    """`recipe` with each layer's config changed (name -> (stage index, changes on top of its config));
    the names in `patterns` are name patterns of groups of layers, written as they are."""
    stages = list(recipe.stages)
    for name, (index, changes) in layer_changes.items():
        stages[index] = with_override(stages[index], name, changes, exact=name not in patterns)
    return Recipe(tuple(stages), name=recipe.name)


def with_override(stage: Stage, name: str, changes: dict[str, Any], exact: bool = True) -> Stage:
    """`stage` with one exact-name override (or, with `exact=False`, the pattern `name`), appended last,
    that makes layer `name`'s config its current one plus `changes` whatever other overrides match it.
    An earlier override with the same pattern is folded in (a YAML mapping cannot hold the pattern twice)."""
    target = {**config_to_dict(stage.config_for(name)), **changes}
    pattern = exact_pattern(name) if exact else name
    kept = dataclasses.replace(stage, overrides=tuple((p, c) for p, c in stage.overrides if p != pattern))
    current = config_to_dict(kept.config_for(name))
    diff = {k: v for k, v in target.items() if current.get(k) != v}
    out = dataclasses.replace(kept, overrides=kept.overrides + ((pattern, diff),)) if diff else kept
    out.config_for(name)  # an invalid change fails here, naming the override
    return out


def exact_pattern(name: str) -> str:
    """An fnmatch pattern that matches `name` only: wildcard characters as one-character classes."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
