"""The pass registry: a compression technique is a frozen config dataclass plus one function.

A pass function takes the model and its resolved targets (module name, module, per-layer
config) and rewrites those modules in place. Recipes name passes by the string under which they
were registered; `register_pass` ties that name to the config type and the function.

A *refining* pass (`refines=True`) may also rewrite modules that an earlier recipe stage already
compressed (its `module_types` say which, e.g. CompressedLinear): k-means clustering of the kept
values of a pruned layer is one. Every other pass only ever sees modules no earlier stage took.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from modelpress.errors import ConfigError, RecipeError

__all__ = ["PassContext", "Target", "PassSpec", "PASSES", "register_pass", "pass_for", "config_from_dict", "config_to_dict"]


@dataclass
class Target:
    """One module a pass will rewrite, with the config that applies to it (overrides resolved)."""

    name: str
    module: nn.Module
    config: Any


@dataclass
class PassContext:
    """What passes share: calibration inputs (for data-aware passes) and a log of what was done."""

    calibration: Any = None
    log: list[str] = field(default_factory=list)


PassFn = Callable[[nn.Module, list[Target], PassContext], None]


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_type: type
    fn: PassFn
    module_types: tuple[type, ...]  # module types the pass can rewrite
    refines: bool = False  # may select modules an earlier stage already rewrote


PASSES: dict[str, PassSpec] = {}


def register_pass(
    name: str, config_type: type, module_types: tuple[type, ...], refines: bool = False
) -> Callable[[PassFn], PassFn]:
    """Decorator: register `fn` as the pass `name`, configured by `config_type`.

    `refines=True` lets the pass select modules earlier stages already rewrote (see the module docstring).
    """

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = PassSpec(name, config_type, fn, module_types, refines)
        return fn

    return wrap


def pass_for(name: str) -> PassSpec:
    if not isinstance(name, str) or name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}: use one of {sorted(PASSES)}")
    return PASSES[name]


def config_from_dict(config_type: type, data: dict[str, Any], where: str) -> Any:
    """Build a config dataclass from plain data through its field allow-list (never eval)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: config must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; allowed fields are {sorted(fields)}")
    values = {}
    for key, value in data.items():
        enum_type = _enum_type(config_type, key)
        if enum_type is not None and not isinstance(value, enum_type):
            try:
                value = enum_type(value)
            except ValueError:
                raise RecipeError(
                    f"{where}: {key}={value!r} is not valid; use one of {[e.value for e in enum_type]}"
                ) from None
        values[key] = value
    try:
        return config_type(**values)
    except ConfigError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _enum_type(config_type: type, key: str) -> type[enum.Enum] | None:
    default = next(f.default for f in dataclasses.fields(config_type) if f.name == key)
    return type(default) if isinstance(default, enum.Enum) else None


def config_to_dict(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = value.value if isinstance(value, enum.Enum) else value
    return out
