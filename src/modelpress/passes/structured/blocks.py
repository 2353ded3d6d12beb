"""What the structured passes match blocks by: their shape (named children), not their class, so that a
recipe selects the blocks of any transformer; and the plain Linear layers a structured cut needs."""

from __future__ import annotations

from typing import Any

from torch import nn

from modelpress.errors import ConfigError

__all__ = ["Shape", "child", "plain_linears"]


class Shape(type):
    """A pseudo-type matched by structure: `isinstance(obj, Block)` asks `Block.matches(obj)`."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return cls.matches(obj)


def child(module: nn.Module, path: str) -> nn.Module | None:
    """The sub-module at a dotted `path`, or None where a step is missing or not a module."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def plain_linears(name: str, block: nn.Module, paths: tuple[str, ...]) -> list[nn.Linear]:
    """The Linear layers at `paths` of block `name`, refused unless every one is a plain (uncompressed) Linear."""
    layers = [child(block, p) for p in paths]
    for path, layer in zip(paths, layers):
        if type(layer) is not nn.Linear:
            raise ConfigError(f"cannot structurally prune {name!r}: {path} is a {type(layer).__name__}, not a plain "
                              "Linear; prune before quantising (put the structured stage first)")
    return layers
