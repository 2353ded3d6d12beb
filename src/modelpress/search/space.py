"""The per-layer options of a joint search (bits and groups, sparsity and N:M, low rank), and the
ordinary recipe an allocation of them is.

An `Option` is one pass with one config ("int4 g32": rtn at 4 bits in groups of 32; "2:4+int4":
magnitude pruning to 2 of every 4 with the kept values at 4 bits; "rank 50%+int4": low rank keeping
half the parameters, factors at 4 bits). `allocation_recipe` writes a choice of one option per layer
as a recipe of one stage per pass used, each selecting its layers by exact name (per-layer overrides where
options of one pass differ): `compress` with it (or with its YAML) rewrites every layer as the search's
validation measured it.
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
from modelpress.search.overrides import exact_pattern, with_override

__all__ = ["Option", "allocation_recipe", "applies", "default_space", "is_q4_1_like", "parse_space", "SPACE_NAMES"]


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


def _llm_gptq(bits: int, symmetric: bool) -> Option:
    label = f"gptq{bits} {'s' if symmetric else 'a'}32"  # s: symmetric (Q4_0's grid at 4 bits); a: a float minimum
    return Option.of(label, "gptq", {"bits": bits, "symmetric": symmetric, "group_size": 32, "search": "mse",
                                     "act_order": True}, ("Linear",))


def _llm_embedding(bits: int, group: int | str, symmetric: bool) -> Option:
    label = f"emb int{bits} " + ("ch" if group == "channel" else f"{'s' if symmetric else 'a'}{group}")
    return Option.of(label, "rtn", {"bits": bits, "symmetric": symmetric, "group_size": group, "search": "mse"},
                     ("Embedding",))


def is_q4_1_like(option: Option) -> bool:
    """A 4-bit format in groups of 32 with a float minimum (asymmetric): llama.cpp Q4_1's grid."""
    c = option.config_dict
    return c.get("bits") == 4 and c.get("group_size") == 32 and c.get("symmetric") is False


SPACE_NAMES = ("bits", "small", "joint", "gptq", "gptq-small", "llm", "llm-no-q4_1")


def default_space(name: str = "joint") -> list[Option]:
    """The options of a named search space.

    - `bits`: 2/3/4 bits in groups of 32, 64 and 128 (asymmetric, MSE ranges) and 8 bits per channel;
    - `small`: 2/3/4 bits in groups of 64, 4 bits in groups of 32, 8 bits per channel (quick searches);
    - `joint`: `bits` plus 50% unstructured and 2:4 sparsity (kept values at 4 bits) and low rank keeping
      50% and 75% of the parameters (factors at 4 bits), for the Linear layers;
    - `gptq`: `bits` plus GPTQ at 3 and 4 bits in groups of 128, 64 and 32 for the Linear layers, and 2:4
      sparsity (calibration needed: --calibration N);
    - `gptq-small`: GPTQ 4 bits in groups of 128, 64, 32 and 3 bits in groups of 64 for the Linear layers,
      8 bits per channel, and RTN at 2, 3 and 4 bits for the embedding tables (calibration needed);
    - `llm` (decoder LLMs; calibration needed): GPTQ act-order in groups of 32 for the Linear layers at 3 and
      4 bits symmetric and 4 bits with a float minimum, and for the (tied) token embedding 8 bits per row or
      4 bits in groups of 32, symmetric or with a float minimum;
    - `llm-no-q4_1`: `llm` without the 4-bit group-32 float-minimum formats (`is_q4_1_like`: Q4_1's grid,
      which a model distributed as Q4_1 lies on exactly).
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
    if name in ("llm", "llm-no-q4_1"):
        space = [_llm_gptq(3, True), _llm_gptq(4, True), _llm_gptq(4, False), _llm_embedding(8, "channel", True),
                 _llm_embedding(4, 32, True), _llm_embedding(4, 32, False)]
        return space if name == "llm" else [o for o in space if not is_q4_1_like(o)]
    raise ConfigError(f"unknown search space {name!r}: use one of {list(SPACE_NAMES)}")


def parse_space(name: str) -> list[Option]:
    return default_space(name)


def allocation_recipe(choice: Mapping[str, Option], name: str = "searched") -> Recipe:
    """A recipe that compresses each layer of `choice` with its option (layers not in `choice` stay).

    Options of one pass share one stage: it selects all their layers by exact name, takes the config of the
    option with the most layers, and holds an exact-name override for each layer of the others. So a
    candidate that mixes GPTQ bits and groups runs GPTQ once, layer after layer in model order, as the
    table measured each GPTQ option (every layer of it in one stage). Stages follow the order of their
    passes' first labels."""
    if not choice:
        raise ConfigError("an allocation needs at least one layer: search a model with layers to compress")
    by_pass: dict[str, dict[Option, list[str]]] = {}
    for layer, option in choice.items():
        by_pass.setdefault(option.pass_name, {}).setdefault(option, []).append(layer)
    stages = []
    for groups in sorted(by_pass.values(), key=lambda g: min(o.label for o in g)):
        base = min(groups, key=lambda o: (-len(groups[o]), o.label))
        stage = base.stage(sorted(layer for layers in groups.values() for layer in layers))
        for option in sorted(groups, key=lambda o: o.label):
            if option != base:
                for layer in sorted(groups[option]):
                    stage = with_override(stage, layer, option.config_dict)
        stages.append(stage)
    return Recipe(tuple(stages), name=name)
