"""The per-layer options of a joint search (bits and groups, sparsity and N:M, low rank), and the
ordinary recipe an allocation of them is.

An `Option` is one pass with one config ("int4 g32": rtn at 4 bits in groups of 32; "2:4+int4":
magnitude pruning to 2 of every 4 with the kept values at 4 bits; "rank 50%+int4": low rank keeping
half the parameters, factors at 4 bits). `allocation_recipe` writes a choice of one option per layer
as a recipe of one stage per option used, each selecting its layers by exact name: `compress` with it
(or with its YAML) rewrites every layer exactly as the search measured it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from modelpress.errors import ConfigError
from modelpress.passes.base import pass_for
from modelpress.passes.config import config_from_dict
from modelpress.recipe import Recipe, Selector, Stage
from modelpress.search.overrides import exact_pattern

__all__ = ["Option", "allocation_recipe", "applies", "default_space", "parse_space", "SPACE_NAMES"]


@dataclass(frozen=True)
class Option:
    """One way to compress a layer: a pass and its config (plain data, as a recipe writes it)."""

    label: str
    pass_name: str
    config: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs: hashable, and stable in JSON
    types: tuple[str, ...] = ()  # only modules of these class names (default: every type the pass handles)

    @classmethod
    def of(cls, label: str, pass_name: str, config: Mapping[str, Any], types: Iterable[str] = ()) -> "Option":
        spec = pass_for(pass_name)
        config_from_dict(spec.config_type, dict(config), f"search option {label!r}")  # refused here if invalid
        return cls(label, spec.name, tuple(sorted(config.items())), tuple(types))

    @property
    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)

    def stage(self, names: Iterable[str]) -> Stage:
        """This option as a recipe stage that selects exactly the layers `names`."""
        spec = pass_for(self.pass_name)
        config = config_from_dict(spec.config_type, self.config_dict, f"search option {self.label!r}")
        return Stage(spec.name, config, Selector(include=tuple(exact_pattern(n) for n in names)))

    def to_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "pass": self.pass_name, "config": self.config_dict}
        return {**out, "types": list(self.types)} if self.types else out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Option":
        return cls.of(str(data["label"]), str(data["pass"]), dict(data["config"]), data.get("types", ()))


def applies(option: Option, module: nn.Module) -> bool:
    """Whether the option's pass rewrites modules of this type, and its groups divide the rows."""
    if not isinstance(module, pass_for(option.pass_name).module_types):
        return False
    if option.types and type(module).__name__ not in option.types:
        return False
    group = option.config_dict.get("group_size")
    weight = getattr(module, "weight", None)
    if isinstance(group, int) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        kept = weight.shape[1] // 2 if option.pass_name == "magnitude" else weight.shape[1]  # 50% or 2:4
        return kept % group == 0
    return True


def _rtn(bits: int, group: int | str, types: tuple[str, ...] = ()) -> Option:
    label = ("emb " if types == ("Embedding",) else "") + f"int{bits} " + ("ch" if group == "channel" else f"g{group}")
    return Option.of(label, "rtn", {"bits": bits, "symmetric": False, "group_size": group, "search": "mse"}, types)


def _sparse(pattern: str, bits: int) -> Option:
    config = {"bits": bits, "group_size": 32, "symmetric": False}  # groups of the kept half of each row
    if ":" in pattern:
        return Option.of(f"{pattern}+int{bits}", "magnitude", {"pattern": pattern, **config})
    return Option.of(f"sp{pattern}%+int{bits}", "magnitude",
                     {"sparsity": int(pattern) / 100, "scope": "row", **config})


def _rank(percent: int, bits: int) -> Option:
    return Option.of(f"rank{percent}%+int{bits}", "lowrank",
                     {"budget": percent / 100, "bits": bits, "group_size": "channel", "skip_if_larger": False})


def _gptq(bits: int, group: int) -> Option:
    return Option.of(f"gptq{bits} g{group}", "gptq",
                     {"bits": bits, "symmetric": False, "group_size": group, "search": "mse"})


SPACE_NAMES = ("bits", "small", "joint", "gptq", "gptq-small")


def default_space(name: str = "joint") -> list[Option]:
    """The options of a named search space.

    - `bits`: 2/3/4 bits in groups of 32, 64 and 128 (asymmetric, MSE ranges) and 8 bits per channel;
    - `small`: 2/3/4 bits in groups of 64, 4 bits in groups of 32, 8 bits per channel (quick searches);
    - `joint`: `bits` plus 50% unstructured and 2:4 sparsity (kept values at 4 bits) and low rank keeping
      50% and 75% of the parameters (factors at 4 bits), for the Linear layers;
    - `gptq`: `bits` plus GPTQ at 3 and 4 bits in groups of 128, 64 and 32 for the Linear layers, and 2:4
      sparsity (calibration needed: --calibration N);
    - `gptq-small`: GPTQ 4 bits in groups of 128, 64, 32 and 3 bits in groups of 64 for the Linear layers,
      8 bits per channel, and RTN at 2, 3 and 4 bits for the embedding tables (calibration needed).
    """
    if name == "small":
        return [_rtn(2, 64), _rtn(3, 64), _rtn(4, 64), _rtn(4, 32), _rtn(8, "channel")]
    bits = [_rtn(b, g) for b in (2, 3, 4) for g in (128, 64, 32)] + [_rtn(8, "channel")]
    if name == "bits":
        return bits
    if name == "joint":
        return bits + [_sparse("50", 4), _sparse("2:4", 4), _rank(50, 4), _rank(75, 4)]
    if name == "gptq":  # data-aware: needs calibration
        return bits + [_gptq(b, g) for b in (3, 4) for g in (128, 64, 32)] + [_sparse("2:4", 4)]
    if name == "gptq-small":
        emb = ("Embedding",)
        return ([_gptq(4, 128), _gptq(4, 64), _gptq(4, 32), _gptq(3, 64), _rtn(8, "channel")]
                + [_rtn(2, 64, emb), _rtn(3, 128, emb), _rtn(3, 64, emb), _rtn(3, 32, emb), _rtn(4, 64, emb)])
    raise ConfigError(f"unknown search space {name!r}: use one of {list(SPACE_NAMES)}")


def parse_space(name: str) -> list[Option]:
    return default_space(name)


def allocation_recipe(choice: Mapping[str, Option], name: str = "searched") -> Recipe:
    """A recipe that compresses each layer of `choice` with its option: one stage per option used, in the
    order of the options' labels, each selecting its layers by exact name (layers not in `choice` stay)."""
    if not choice:
        raise ConfigError("an allocation needs at least one layer: search a model with layers to compress")
    by_option: dict[Option, list[str]] = {}
    for layer, option in choice.items():
        by_option.setdefault(option, []).append(layer)
    stages = tuple(option.stage(sorted(by_option[option])) for option in sorted(by_option, key=lambda o: o.label))
    return Recipe(stages, name=name)
