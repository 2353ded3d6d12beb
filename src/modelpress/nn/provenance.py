"""Provenance: the recipe a model was compressed with and the log of what each pass did.

`compress` records it (`record_provenance`), a load restores the recipe from the checkpoint, and
everyone else reads it through `provenance(model)`. The recipe is kept as plain data (what
`Recipe.to_dict()` gives), so that checkpoints and the store carry it without parsing it;
`Recipe.from_dict(provenance(model).recipe)` makes a Recipe of it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

__all__ = ["Provenance", "provenance", "record_provenance"]

_ATTR = "_modelpress_provenance"  # read and written by the two functions below only


@dataclass(frozen=True)
class Provenance:
    recipe: dict[str, Any] | None = None  # the recipe as plain data, or None (not compressed by a recipe)
    log: tuple[str, ...] = ()  # one line per module (or group of modules) a pass rewrote

    @property
    def recipe_name(self) -> str | None:
        name = self.recipe.get("name") if isinstance(self.recipe, dict) else None
        return name if isinstance(name, str) else None


def record_provenance(model: nn.Module, recipe: dict[str, Any] | None, log: Iterable[str] = ()) -> None:
    """Keep `recipe` (plain data) and `log` with `model`, replacing what it had."""
    if recipe is not None and not isinstance(recipe, dict):
        raise TypeError(f"provenance records a recipe as plain data (Recipe.to_dict()), not a {type(recipe).__name__}")
    setattr(model, _ATTR, Provenance(recipe, tuple(log)))


def provenance(model: nn.Module) -> Provenance:
    """What `model` was compressed with (an empty Provenance for a model no recipe touched)."""
    return getattr(model, _ATTR, None) or Provenance()
