"""The pass registry: a compression technique is a frozen config dataclass plus one function.

A pass function takes the model and its resolved targets (module name, module, per-layer
config) and rewrites those modules in place. `register_pass` ties a name (what recipes write)
and a config type (what Python callers hand over: `compress(model, GPTQConfig(bits=4))`) to the
function; each config type belongs to exactly one pass, so a config says which pass it is for.

A *refining* pass (`refines=True`) may also rewrite modules that an earlier recipe stage already
compressed (its `module_types` say which, e.g. CompressedLinear): k-means clustering of the kept
values of a pruned layer is one. Every other pass only ever sees modules no earlier stage took.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from modelpress.encodings import Encoding, as_matrix
from modelpress.errors import ConfigError, RecipeError
from modelpress.nn import install
from modelpress.nn.tying import tied_modules

__all__ = ["PassContext", "Target", "PassSpec", "PASSES", "check_untied", "install_tied", "register_pass", "pass_for",
           "pass_for_config", "tied_partners", "weight_matrix"]


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
_BY_CONFIG: dict[type, PassSpec] = {}


def register_pass(
    name: str, config_type: type, module_types: tuple[type, ...], refines: bool = False
) -> Callable[[PassFn], PassFn]:
    """Decorator: register `fn` as the pass `name`, configured by `config_type` (one pass per config type).

    `refines=True` lets the pass select modules earlier stages already rewrote (see the module docstring).
    """

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES or config_type in _BY_CONFIG:
            raise ValueError(f"pass {name!r} or its config {config_type.__name__} registered twice")
        PASSES[name] = _BY_CONFIG[config_type] = PassSpec(name, config_type, fn, module_types, refines)
        return fn

    return wrap


def pass_for(name: str) -> PassSpec:
    """The pass registered as `name`."""
    if not isinstance(name, str) or name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}: use one of {sorted(PASSES)}")
    return PASSES[name]


def pass_for_config(config: Any) -> PassSpec:
    """The pass that `config` configures, found from its type."""
    spec = _BY_CONFIG.get(type(config))
    if spec is None:
        known = sorted(t.__name__ for t in _BY_CONFIG)
        raise RecipeError(f"a {type(config).__name__} configures no pass: give one of {known}")
    return spec


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A layer's float weight viewed as the matrix (R, C) (a conv's as (R, Cin*kh*kw)), detached."""
    return as_matrix(module.weight.detach().float())


# ---------------------------------------------------------------------------------------------
# Tied weights (a language model's token embedding and output layer share one weight Parameter)


def tied_partners(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """For each of `names`, the other modules of `model` that share its weight (nn.tying.tied_modules).

    Found before a pass changes anything: a pass that rebinds a layer's weight during calibration
    (GPTQ) would otherwise no longer see the tie when it installs the encoding.
    """
    return {name: tied_modules(model, name) for name in names}


def install_tied(model: nn.Module, name: str, encoding: Encoding, kernel, partners: list[str]) -> list[str]:
    """Install `encoding` as layer `name`'s weight and as the weight of each tied partner (one encoding
    object for all of them, so a tied weight stays one tensor); returns the names installed."""
    install(model, name, encoding, kernel)
    for partner in partners:
        install(model, partner, encoding, kernel)
    return [name, *partners]


def check_untied(model: nn.Module, targets: list[Target], pass_name: str) -> None:
    """Refuse targets whose weight is tied to another module's: a pass that rescales a weight's columns
    (AWQ, SmoothQuant) would rescale the partner too (a tied output layer's embedding)."""
    for name, partners in tied_partners(model, [t.name for t in targets]).items():
        if partners:
            raise ConfigError(f"layer {name!r} shares its weight with {partners[0]!r}, which {pass_name} would rescale "
                              "too: quantise it with rtn or gptq (as the llm presets do), or ignore it")
