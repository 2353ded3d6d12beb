"""Storing a model's plain float parameters (biases, norms) in half precision.

In a heavily compressed small model the weights shrink to a few bits each, and the float32
biases that nobody compressed become a large share of the file (a pruned, clustered LeNet-300-100
spends a third of its bytes on them). `save(..., float_params="float16")` writes the plain
float32 state tensors as float16 and records which; loading widens them back to their original
dtype, so the loaded model runs exactly what the file holds (the rounding is the only change,
and evaluations of a saved model see it).

Manifest entry: "narrowed_floats": {"dtype": "float16" | "bfloat16", "from": "float32", "names": [...]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modelpress.errors import ConfigError, FormatError

__all__ = ["NARROW_KEY", "NARROW_DTYPES", "narrow_floats", "widen_floats"]

NARROW_KEY = "narrowed_floats"
NARROW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def narrow_floats(tensors: dict[str, torch.Tensor], names: set[str], dtype: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The float32 tensors among `names` cast to `dtype`, and the manifest entry that undoes it."""
    if dtype not in NARROW_DTYPES:
        raise ConfigError(f"float_params {dtype!r} is not valid: use one of {sorted(NARROW_DTYPES)} or None")
    out = dict(tensors)
    narrowed = sorted(n for n in names if tensors[n].dtype == torch.float32)
    for name in narrowed:
        out[name] = tensors[name].to(NARROW_DTYPES[dtype])
    return out, {"dtype": dtype, "from": "float32", "names": narrowed}


def widen_floats(tensors: dict[str, torch.Tensor], entry: Any, where: Path) -> dict[str, torch.Tensor]:
    """Undo `narrow_floats`, checking the (untrusted) manifest entry."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{where}: {NARROW_KEY} {what}; the checkpoint is corrupt, re-save the model")

    if (not isinstance(entry, dict) or set(entry) != {"dtype", "from", "names"}
            or not isinstance(entry["dtype"], str) or entry["dtype"] not in NARROW_DTYPES or entry["from"] != "float32"
            or not isinstance(entry["names"], list)):
        raise bad("is malformed")
    out = dict(tensors)
    for name in entry["names"]:
        if not isinstance(name, str) or name not in tensors:
            raise bad(f"names a tensor {name!r} the file does not hold")
        if tensors[name].dtype != NARROW_DTYPES[entry["dtype"]]:
            raise bad(f"says {name!r} is {entry['dtype']}, the file holds {tensors[name].dtype}")
        out[name] = tensors[name].float()
    return out
