"""Recipes: an ordered list of passes, each with target selectors and per-layer overrides.

A recipe is plain data, writable as YAML:

    version: 1
    name: int4
    stages:
      - pass: rtn
        targets: {types: [Linear, Embedding], include: ["*"], ignore: ["pooler.*"]}
        config: {bits: 4, symmetric: false, group_size: 64, search: mse}
        overrides: {"embeddings.word_embeddings": {group_size: 32}}

`include`/`ignore`/override keys are fnmatch patterns over module names (as in
`model.named_modules()`); `types` are class names. Parsing goes through allow-lists only.

Each module is rewritten by the first stage that selects it; later stages skip it, except
stages of a *refining* pass (registered with `refines=True`), which may select modules an
earlier stage already compressed, among the types the pass handles. Pruning then clustering the
kept values is two stages:

    stages:
      - pass: magnitude
        config: {sparsity: 0.5}
      - pass: kmeans          # refines: picks up the pruned CompressedLinear layers
        config: {bits: 4}

From Python, a stage's pass is found from its config's type (`Stage.of(GPTQConfig(bits=4))`), and a
recipe can be an ordered map of module-name patterns to configs (`Recipe.from_configs`): the first
pattern that matches a module's name decides, and `None` leaves those modules as they are.
A stage whose config is not its pass's config type is refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from torch import nn

from modelpress import fileio
from modelpress.errors import NotRegularFileError, RecipeError
from modelpress.limits import MAX_RECIPE_BYTES
from modelpress.nn.registry import replaced_name
from modelpress.passes.base import Target, pass_for, pass_for_config
from modelpress.passes.config import PassConfig, config_from_dict, config_to_dict
from modelpress.safeparse import load_yaml

__all__ = ["Selector", "Stage", "Recipe", "RECIPE_VERSION", "is_pattern_map"]

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Selector:
    """Which modules a stage rewrites: name patterns and class names, minus ignored patterns."""

    include: tuple[str, ...] = ("*",)
    types: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def matches(self, name: str, module: nn.Module) -> bool:
        # A compressed module also answers to the class name of the layer it replaced, so that
        # `types: [Linear]` in a refining stage finds the Linear layers an earlier stage compressed.
        cls = type(module).__name__
        if self.types and cls not in self.types and replaced_name(cls) not in self.types:
            return False
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.ignore)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Selector":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: targets must be a mapping with include/types/ignore")
        unknown = sorted(set(data) - {"include", "types", "ignore"})
        if unknown:
            raise RecipeError(f"{where}: unknown target field(s) {unknown}; allowed are include, types, ignore")
        values = {}
        for key in ("include", "types", "ignore"):
            if key in data:
                value = data[key]
                value = [value] if isinstance(value, str) else value
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise RecipeError(f"{where}: targets.{key} must be a list of strings")
                values[key] = tuple(value)
        return cls(**values)

    def to_dict(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "types": list(self.types), "ignore": list(self.ignore)}


@dataclass(frozen=True)
class Stage:
    """One pass applied to the modules its selector picks, with per-pattern config overrides."""

    pass_name: str
    config: Any
    targets: Selector = Selector()
    overrides: tuple[tuple[str, dict[str, Any]], ...] = ()
    optional: bool = False  # a stage that may select nothing (e.g. embeddings, in a preset)

    def __post_init__(self) -> None:
        spec = pass_for(self.pass_name)
        if type(self.config) is not spec.config_type:
            raise RecipeError(f"stage {self.pass_name!r} takes a {spec.config_type.__name__}, not a "
                              f"{type(self.config).__name__}: use Stage.of(config) to find the pass from the config")

    @classmethod
    def of(cls, config: PassConfig, targets: "Selector" = Selector(), **kwargs: Any) -> "Stage":
        """The stage of the pass that `config` configures (found from its type)."""
        return cls(pass_for_config(config).name, config, targets, **kwargs)

    def config_for(self, name: str) -> Any:
        """The stage config with every override whose pattern matches `name` applied, in order."""
        cfg = self.config
        for pattern, changes in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                merged = {**config_to_dict(cfg), **changes}
                cfg = config_from_dict(type(cfg), merged, f"override {pattern!r} for {name!r}")
        return cfg

    def resolve(self, model: nn.Module, taken: set[str]) -> list[Target]:
        """Modules this stage rewrites: matching, of a type the pass handles, and not taken by an
        earlier stage unless the pass refines (then taken modules of its types are selected too)."""
        spec = pass_for(self.pass_name)
        return [
            Target(name, module, self.config_for(name))
            for name, module in model.named_modules()
            if name
            and (spec.refines or name not in taken)
            and isinstance(module, spec.module_types)
            and self.targets.matches(name, module)
        ]

    @classmethod
    def from_dict(cls, data: Any, index: int) -> "Stage":
        where = f"stage {index}"
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: each stage must be a mapping with 'pass', 'config', 'targets'")
        unknown = sorted(set(data) - {"pass", "config", "targets", "overrides", "optional"})
        if unknown:
            raise RecipeError(
                f"{where}: unknown field(s) {unknown}; allowed are pass, config, targets, overrides, optional"
            )
        if not isinstance(data.get("optional", False), bool):
            raise RecipeError(f"{where}: optional must be true or false")
        if "pass" not in data:
            raise RecipeError(f"{where}: missing 'pass' (the technique to apply)")
        spec = pass_for(data["pass"])
        where = f"stage {index} ({spec.name})"
        config = config_from_dict(spec.config_type, data.get("config") or {}, where)
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise RecipeError(f"{where}: overrides must map module-name patterns to config changes")
        for pattern, changes in overrides.items():  # validate now, not on first use
            if changes is not None and not isinstance(changes, dict):
                raise RecipeError(f"{where}: override {pattern!r} must be a mapping of config fields, e.g. {{bits: 8}}")
            config_from_dict(spec.config_type, {**config_to_dict(config), **(changes or {})}, f"{where} override {pattern!r}")
        return cls(
            pass_name=spec.name,
            config=config,
            targets=Selector.from_dict(data.get("targets"), where),
            overrides=tuple((str(p), dict(c or {})) for p, c in overrides.items()),
            optional=data.get("optional", False),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.pass_name, "config": config_to_dict(self.config), "targets": self.targets.to_dict()}
        if self.overrides:
            out["overrides"] = {p: c for p, c in self.overrides}
        if self.optional:
            out["optional"] = True
        return out


@dataclass(frozen=True)
class Recipe:
    """An ordered list of stages; each module is rewritten by the first stage that selects it.

    Later stages skip a module once a stage has taken it, except stages of a refining pass
    (`register_pass(..., refines=True)`, e.g. `kmeans`), which may rewrite it again: they select
    already-compressed modules of the types they declare, e.g. a pruned layer to cluster its kept values.
    """

    stages: tuple[Stage, ...]
    name: str = "custom"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if not self.stages:
            raise RecipeError("a recipe needs at least one stage")

    @classmethod
    def from_configs(cls, configs: PassConfig | Mapping[str, PassConfig | None], name: str | None = None) -> "Recipe":
        """A recipe from one config (every module its pass handles) or an ordered {pattern: config} map.

        In a map, the first pattern (fnmatch over module names) that matches a module decides what
        happens to it: its config's pass rewrites it if the pass handles its type, and a `None`
        config leaves it as it is. Each config becomes one stage that ignores every earlier pattern.
        """
        if isinstance(configs, PassConfig):
            stage = Stage.of(configs)
            return cls((stage,), name=name or stage.pass_name)
        if not is_pattern_map(configs):
            raise RecipeError("give a pass config (e.g. GPTQConfig(bits=4)) or an ordered map of module-name "
                              "patterns to configs or None, e.g. {'*.pooler.*': None, '*': RTNConfig()}")
        stages, earlier = [], []
        for pattern, config in configs.items():
            if config is not None:
                stages.append(Stage.of(config, Selector(include=(pattern,), ignore=tuple(earlier))))
            earlier.append(pattern)
        if not stages:
            raise RecipeError("the pattern map leaves every module as it is: give at least one pass config")
        return cls(tuple(stages), name=name or "custom")

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError("a recipe must be a mapping with 'stages' (a list of passes)")
        unknown = sorted(set(data) - {"version", "name", "stages"})
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {unknown}; allowed are version, name, stages")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {version!r} is not supported: this modelpress reads version {RECIPE_VERSION}")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise RecipeError("a recipe needs 'stages': a non-empty list of passes")
        name = data.get("name", "custom")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise RecipeError(f"recipe name {name!r} is not a name: give a short string, e.g. name: int4")
        return cls(tuple(Stage.from_dict(s, i) for i, s in enumerate(stages)), name=name)

    @classmethod
    def from_yaml(cls, text: str | bytes, where: str = "recipe") -> "Recipe":
        """Parse YAML text (size, depth and alias-expansion capped: see modelpress.safeparse)."""
        return cls.from_dict(load_yaml(text, where, MAX_RECIPE_BYTES, hint="fix the recipe YAML", error=RecipeError))

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """Read a recipe file: a regular file of at most MAX_RECIPE_BYTES (not a FIFO, device or link)."""
        what = f"recipe file {str(path)!r}"
        try:
            data = fileio.read_file(path, MAX_RECIPE_BYTES, "recipe file")
        except FileNotFoundError:
            raise RecipeError(f"cannot read {what}: No such file or directory; give a preset name or the path of a YAML "
                              "file") from None
        except NotRegularFileError:
            raise RecipeError(f"cannot read {what}: it is a folder, FIFO, device or symbolic link, not a regular file; "
                              "give the YAML file itself") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"cannot read {what}: it is not UTF-8 text; save it as UTF-8") from None
        return cls.from_yaml(text, what)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "stages": [s.to_dict() for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def is_pattern_map(value: Any) -> bool:
    """Whether `value` is a non-empty map of string patterns to pass configs or None (not a recipe dict)."""
    return (isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value)
            and all(v is None or isinstance(v, PassConfig) for v in value.values()))
