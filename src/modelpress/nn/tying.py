"""Tied weights: one tensor that several modules use (a causal LM's embedding table and output layer).

A float model ties by sharing one `nn.Parameter` (`lm_head.weight is embed_tokens.weight`); a
compressed model ties by sharing one `Encoding` object (`lm_head.encoding is embed_tokens.encoding`).
Model surgery keeps ties (`nn.registry.install` rewrites every module of a tie at once, the tie found
by identity or recorded by name when the model was built: `record_ties`), checkpoints
and store versions hold a tied tensor once and retie on load. This module finds ties and restores
them; it never decides what a tie holds.
"""

from __future__ import annotations

from torch import nn

from modelpress.errors import FormatError

__all__ = ["record_ties", "retie", "tied_modules", "tied_parameters"]

_ATTR = "_modelpress_ties"  # the groups record_ties found, kept on the model as plain names


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{name: first name} for every parameter that is the same object as an earlier one (state-dict names)."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name:
            ties[name] = kept
    return ties


def _shared(module: nn.Module):
    """What a module's weight is: its Encoding if compressed, else its weight Parameter (None if it has neither)."""
    encoding = getattr(module, "encoding", None)
    if encoding is not None:
        return encoding
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return weight


def record_ties(model: nn.Module) -> None:
    """Remember which modules of `model` share their weight now, by name: a pass that rebinds one weight
    while it calibrates (GPTQ keeps the float table for the embedding lookups) still rewrites both."""
    groups: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        shared = _shared(module)
        if name and shared is not None:
            groups.setdefault(id(shared), []).append(name)
    setattr(model, _ATTR, tuple(tuple(g) for g in groups.values() if len(g) > 1))


def tied_modules(model: nn.Module, name: str) -> list[str]:
    """The other modules of `model` whose weight is the same object as module `name`'s (Parameter or Encoding),
    or that `record_ties` found tied to it."""
    shared = _shared(model.get_submodule(name))
    found = [other for other, module in model.named_modules(remove_duplicate=False)
             if shared is not None and other and other != name and _shared(module) is shared]
    for group in getattr(model, _ATTR, ()):
        if name in group:
            found += [other for other in group if other != name and other not in found]
    return found


def retie(model: nn.Module, ties: dict[str, str]) -> None:
    """Make each parameter `name` the same object as `ties[name]` (after a load gave each its own copy).

    `ties` may come from a file: both names must be parameters of `model` with the same shape and dtype.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, kept in ties.items():
        if name not in params or kept not in params or name == kept:
            raise FormatError(f"tied weight {name!r} -> {kept!r} does not name two parameters of the model")
        a, b = params[name], params[kept]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise FormatError(f"tied weights {name!r} and {kept!r} differ in shape or dtype")
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, b)
