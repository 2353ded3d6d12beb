"""The record of a simplified model (passes/simplify), which a load replays on a fresh skeleton.

Simplification replaces folded BatchNorms and Dropouts by nn.Identity and gives a conv or Linear
without a bias the bias a fold produced, so the model no longer matches the skeleton its
architecture builds. The record, {"identity": [names], "bias_added": [names]}, is kept with the
model (`simplified_record` / `set_simplified_record`), saved in checkpoints, checked when read
(`check_simplified`) and replayed before the weights are loaded (`apply_simplified`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from modelpress.errors import FormatError

__all__ = ["BATCHNORM_AFTER", "RECORD_KEYS", "apply_simplified", "check_simplified", "set_simplified_record",
           "simplified_record"]

RECORD_KEYS = ("identity", "bias_added")
MAX_RECORD_NAMES = 100_000  # names a checkpoint may list
BATCHNORM_AFTER = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}  # producer type -> foldable BN type
_ATTR = "_modelpress_simplified"  # read and written by the two functions below only


def simplified_record(model: nn.Module) -> dict[str, list[str]] | None:
    """What simplification did to `model` ({"identity": [...], "bias_added": [...]}), or None."""
    return getattr(model, _ATTR, None)


def set_simplified_record(model: nn.Module, record: dict[str, list[str]]) -> None:
    setattr(model, _ATTR, {key: sorted(set(record.get(key, []))) for key in RECORD_KEYS})


def check_simplified(record: Any) -> dict[str, list[str]]:
    """Validate the shape of a record read from a file (names are checked against a model by apply_simplified)."""
    if not isinstance(record, dict) or not set(record) <= set(RECORD_KEYS):
        raise FormatError(f"'simplified' must be a mapping with only {list(RECORD_KEYS)}")
    for key in RECORD_KEYS:
        names = record.get(key, [])
        if (not isinstance(names, list) or len(names) > MAX_RECORD_NAMES
                or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
            raise FormatError(f"'simplified.{key}' must be a list of distinct module names")
    return {key: list(record.get(key, [])) for key in RECORD_KEYS}


def apply_simplified(model: nn.Module, record: Any) -> None:
    """Replay a simplification on a freshly built skeleton: Identity for the recorded BatchNorms and
    Dropouts, a zero bias where folding added one (its values come from the state dict). All names
    are checked before anything changes."""
    record = check_simplified(record)
    known = dict(model.named_modules())
    for name in record["identity"]:
        if not isinstance(known.get(name), (nn.BatchNorm1d, nn.BatchNorm2d, _DropoutNd, nn.Identity)):
            raise FormatError(f"simplified module {name!r} is not a BatchNorm or Dropout of the model")
    for name in record["bias_added"]:
        if type(known.get(name)) not in BATCHNORM_AFTER:
            raise FormatError(f"simplified module {name!r} is not a Conv2d or Linear of the model")
    for name in record["identity"]:
        model.set_submodule(name, nn.Identity())
    for name in record["bias_added"]:
        layer = known[name]
        if layer.bias is None:
            out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype))
    setattr(model, _ATTR, record)
