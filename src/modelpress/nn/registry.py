"""The compressed module types, in one registry: how each is built and how it is saved.

Every compressed module class (CompressedLinear, CompressedEmbedding, CompressedConv2d) registers
under the name manifests write (`@register_compressed("linear", replaces=nn.Linear)`) and brings
three methods:

    build(source, weight, kernel, bias)   the twin of `source` (the float module it replaces, an
                                          earlier compressed twin, or a training stand-in) with
                                          `weight` (an Encoding) as its weight
    manifest_fields()                     what a manifest records besides its type and weight
    from_manifest(name, entry, weight, current)   the module back from a (hostile) manifest entry,
                                          checked against `current`, the skeleton's module

Passes build compressed modules with `compressed_twin` / `install`; checkpoints describe and
rebuild them with `module_entry` / `module_from_entry`; recipes' `types: [Linear]` also select
Linear's compressed twin through `replaced_name`. Adding a compressed module type is one class
with those three methods.

Modules that exist only during training (QAT's fake-quantised layers, trainable codebooks) derive
from `TrainingModule`: they say which float type they stand for (so they convert like it) and why
they cannot be saved as they are (`check_saveable`).
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from modelpress.encodings import Encoding
from modelpress.errors import ConfigError, FormatError
from modelpress.nn.tying import tied_modules

__all__ = [
    "KEEP",
    "COMPRESSED_TYPES",
    "TrainingModule",
    "check_saveable",
    "compressed_twin",
    "install",
    "is_compressed",
    "kind_of",
    "module_entry",
    "module_from_entry",
    "register_compressed",
    "replaced_name",
    "source_bias",
]

COMPRESSED_TYPES: dict[str, type[nn.Module]] = {}  # manifest type name -> compressed module class
KEEP: Any = object()  # `bias=KEEP`: the twin takes the source module's bias

M = TypeVar("M", bound=type[nn.Module])


def register_compressed(name: str, replaces: type[nn.Module]):
    """Class decorator: register a compressed module type under the manifest name `name`."""

    def wrap(cls: M) -> M:
        if name in COMPRESSED_TYPES:
            raise ValueError(f"compressed module type {name!r} registered twice")
        cls.manifest_type, cls.replaces = name, replaces
        COMPRESSED_TYPES[name] = cls
        return cls

    return wrap


class TrainingModule(nn.Module):
    """A module that exists only while training and stands in for a float layer until converted."""

    stands_for: ClassVar[type[nn.Module] | None] = None  # the float type it converts like (nn.Linear, nn.Conv2d)
    not_saveable: ClassVar[str]  # why it cannot be saved, and what to call first


def _class_for(module: nn.Module) -> type[nn.Module] | None:
    """The compressed class that `module` (float, compressed or a training stand-in) converts to."""
    kind = getattr(type(module), "stands_for", None) if isinstance(module, TrainingModule) else None
    for cls in COMPRESSED_TYPES.values():
        if isinstance(module, cls) or isinstance(module, cls.replaces) or (kind is not None and kind is cls.replaces):
            return cls
    return None


def kind_of(module: nn.Module) -> str | None:
    """'linear', 'conv2d', 'embedding' for a float layer, its compressed twin or a stand-in; None otherwise."""
    cls = _class_for(module)
    return None if cls is None else cls.manifest_type


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, tuple(COMPRESSED_TYPES.values()))


def replaced_name(class_name: str) -> str | None:
    """The float class a compressed class name stands for ('CompressedLinear' -> 'Linear')."""
    cls = next((c for c in COMPRESSED_TYPES.values() if c.__name__ == class_name), None)
    return None if cls is None else cls.replaces.__name__


def source_bias(source: nn.Module, bias: Any) -> torch.Tensor | None:
    """The bias a twin gets: `source`'s own for KEEP, else the one given (None for no bias)."""
    if bias is not KEEP:
        return bias
    return None if source.bias is None else source.bias.data


def weight_shape(source: nn.Module) -> tuple[int, ...]:
    """The shape of `source`'s weight, without decoding a compressed one."""
    encoding = getattr(source, "encoding", None)
    if isinstance(encoding, Encoding):
        return tuple(encoding.shape)
    return tuple(source.weight.shape)


def compressed_twin(source: nn.Module, weight: Encoding, kernel: Any = None, bias: Any = KEEP) -> nn.Module:
    """The compressed module that replaces `source`, holding `weight` (same geometry, `source`'s bias).

    `kernel` is the Kernel a Linear runs; None keeps the one a compressed `source` had where it can
    run `weight` (else auto). Embeddings and convolutions choose their own.
    """
    cls = _class_for(source)
    if cls is None:
        raise ConfigError(f"a {type(source).__name__} has no compressed form: only "
                          f"{sorted(c.replaces.__name__ for c in COMPRESSED_TYPES.values())} layers are compressed")
    if tuple(weight.shape) != weight_shape(source):
        raise ConfigError(f"encoded weight has shape {tuple(weight.shape)}, the layer expects {weight_shape(source)}")
    return cls.build(source, weight, kernel, bias)


def install(model: nn.Module, name: str, weight: Encoding, kernel: Any = None, bias: Any = KEEP) -> nn.Module:
    """Swap layer `name` of `model` for its compressed twin holding `weight`; returns the twin.

    A tied weight stays tied: every other module whose weight is the same object as `name`'s (a causal
    LM's embedding table and output layer, see nn/tying.py) is swapped for its own twin holding the same
    `weight` object, keeping its own bias (`kernel` applies to `name` only).
    """
    partners = tied_modules(model, name)
    try:
        twin = compressed_twin(model.get_submodule(name), weight, kernel, bias)
        twins = {other: compressed_twin(model.get_submodule(other), weight) for other in partners}
    except ConfigError as exc:
        raise ConfigError(f"layer {name!r}: {exc}") from None
    model.set_submodule(name, twin)
    for other, partner in twins.items():
        model.set_submodule(other, partner)
    return twin


def module_entry(module: nn.Module) -> dict[str, Any] | None:
    """The manifest entry of a compressed module ({"type", ...its fields, "weight": encoding meta}), else None."""
    if not is_compressed(module):
        return None
    return {"type": module.manifest_type, **module.manifest_fields(), "weight": module.encoding.meta()}


def module_from_entry(name: str, entry: dict[str, Any], weight: Encoding, current: nn.Module) -> nn.Module:
    """The compressed module a manifest entry describes, checked against `current` (the skeleton's module).

    `entry` comes from a file: anything that does not fit raises FormatError naming the module.
    """
    cls = COMPRESSED_TYPES.get(entry.get("type")) if isinstance(entry, dict) else None
    if cls is None:
        raise FormatError(f"module {name!r} has an invalid entry")
    if hasattr(current, "weight") and tuple(weight.shape) != weight_shape(current):
        raise FormatError(f"module {name!r} weight has shape {weight.shape}, the model expects {weight_shape(current)}")
    if not isinstance(current, (cls, cls.replaces)):
        raise FormatError(f"module {name!r} is a {type(current).__name__} in the model, not a {cls.replaces.__name__}")
    try:
        return cls.from_manifest(name, entry, weight, current)
    except FormatError:
        raise
    except ValueError as exc:  # an unknown kernel name, a geometry the module refuses
        raise FormatError(f"module {name!r}: {exc}") from None


def check_saveable(model: nn.Module) -> None:
    """Refuse a model that still holds training-only modules (they must be converted first)."""
    for name, module in model.named_modules():
        if isinstance(module, TrainingModule):
            raise ConfigError(f"module {name!r} {module.not_saveable}")
