"""Pass configs: one frozen dataclass per technique, versioned, composed by nesting, read from flat YAML.

Every pass config derives from `PassConfig` (the `version` field and its check live there) and is
declared with `@pass_config`. Passes that quantise weights hold one nested `WeightQuant` (bit
width, symmetry, groups, how ranges are fitted) instead of copying its fields:

    GPTQConfig(quant=WeightQuant(bits=4, symmetric=False, group_size=64), damp=0.01)
    GPTQConfig(bits=4, group_size=64)        # the same: flat keywords fill in the nested config

Recipes keep their flat YAML keys (`config: {bits: 4, group_size: 64, damp: 0.01}`): each config
class names the flat keys that belong to its `quant` (`QUANT_KEYS`, e.g. QAT's `init` is the
range search), and `config_from_dict` / `config_to_dict` move between the two through that
allow-list (never eval, never pickle).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from modelpress.encodings import QuantScheme, RangeSearch
from modelpress.errors import ConfigError, RecipeError

__all__ = ["CONFIG_VERSION", "PassConfig", "WeightQuant", "config_from_dict", "config_to_dict", "pass_config"]

CONFIG_VERSION = 1
FLAT_QUANT_KEYS = {"bits": "bits", "symmetric": "symmetric", "group_size": "group_size", "search": "search"}


def enum_value(enum_type: type[enum.Enum], value: Any, name: str) -> enum.Enum:
    """`value` as a member of `enum_type`, or a ConfigError listing the valid values."""
    try:
        return enum_type(value)
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not valid: use one of {[e.value for e in enum_type]}") from None


@dataclass(frozen=True)
class WeightQuant:
    """How a pass quantises weights: bit width (None: kept in float), symmetry, groups, range fitting."""

    bits: int | None = 8
    symmetric: bool = True
    group_size: int | str = "channel"  # a positive integer, or the named cases "channel" and "tensor"
    search: RangeSearch = RangeSearch.MINMAX  # how each group's scale and zero are chosen

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", enum_value(RangeSearch, self.search, "search"))
        QuantScheme(8 if self.bits is None else self.bits, self.symmetric, self.group_size)  # validates all three

    @property
    def scheme(self) -> QuantScheme | None:
        """The QuantScheme, or None when the weights stay float (bits None)."""
        return None if self.bits is None else QuantScheme(self.bits, self.symmetric, self.group_size)


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: the version and its check, then the config's own `validate`."""

    QUANT_KEYS: ClassVar[dict[str, str]] = FLAT_QUANT_KEYS  # flat YAML key -> field of the nested `quant`
    version: int = field(default=CONFIG_VERSION, kw_only=True)

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"{type(self).__name__} version {self.version!r} is not supported: "
                              f"this modelpress reads version {CONFIG_VERSION}")
        self.validate()

    def validate(self) -> None:
        """Check the config's own fields (raise ConfigError); called on construction."""


def pass_config(cls: type) -> type:
    """Declare a pass config: a frozen dataclass whose nested `quant` (if any) may be given flat.

    `cls(bits=4, group_size=64)` means `cls(quant=replace(<quant default>, bits=4, group_size=64))`,
    for the flat keys of `cls.QUANT_KEYS`: the keywords YAML uses, also in Python.
    """
    cls = dataclass(frozen=True)(cls)
    if _quant_field(cls) is None:
        return cls
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        flat = {cls.QUANT_KEYS[k]: kwargs.pop(k) for k in list(kwargs) if k in cls.QUANT_KEYS}
        if flat:
            kwargs["quant"] = dataclasses.replace(kwargs.get("quant", _quant_field(cls).default), **flat)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _quant_field(config_type: type) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(config_type) if f.name == "quant"), None)


def _coerce(owner: type, name: str, key: str, value: Any, where: str) -> Any:
    """`value` for field `name` of `owner` (an enum member where the field's default is one)."""
    default = next(f.default for f in dataclasses.fields(owner) if f.name == name)
    if isinstance(default, enum.Enum) and not isinstance(value, type(default)):
        try:
            return type(default)(value)
        except ValueError:
            raise RecipeError(f"{where}: {key}={value!r} is not valid; use one of "
                              f"{[e.value for e in type(default)]}") from None
    return value


def config_from_dict(config_type: type, data: dict[str, Any], where: str) -> Any:
    """Build a pass config from flat plain data through its field allow-list (never eval)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: config must be a mapping, got {type(data).__name__}")
    quant = _quant_field(config_type)
    keys = config_type.QUANT_KEYS if quant is not None else {}
    own = [f.name for f in dataclasses.fields(config_type) if f.name != "quant"]
    unknown = sorted(set(data) - set(own) - set(keys))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; allowed fields are {sorted([*own, *keys])}")
    values = {k: _coerce(config_type, k, k, v, where) for k, v in data.items() if k not in keys}
    flat = {keys[k]: _coerce(WeightQuant, keys[k], k, v, where) for k, v in data.items() if k in keys}
    try:
        if flat:
            values["quant"] = dataclasses.replace(quant.default, **flat)
        return config_type(**values)
    except (ConfigError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A pass config as flat plain data (the nested `quant` under its flat keys), `version` last."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name == "quant":
            out.update((k, _plain(getattr(config.quant, attr))) for k, attr in type(config).QUANT_KEYS.items())
        elif f.name != "version":
            out[f.name] = _plain(getattr(config, f.name))
    out["version"] = config.version
    return out
