"""Compressed models out to the runtimes people deploy with: `export_model(model, fmt, out)`.

One table, format name -> writer. Each writer takes the loaded model and the output path (plus its own
options) and returns a record of what it wrote (its `summary()` is what the CLI prints). A model a
format cannot hold is refused with one line naming what is missing and the nearest thing that works.

    gguf   Llama-family causal LMs, for llama.cpp (exports/gguf.py)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from modelpress.errors import ConfigError
from modelpress.exports.gguf import GGUFExport, export_gguf
from modelpress.formats.models import load_model

__all__ = ["FORMATS", "GGUFExport", "export_gguf", "export_model"]

FORMATS: dict[str, Callable[..., Any]] = {
    "gguf": export_gguf,
}


def export_model(model: nn.Module | str | os.PathLike, fmt: str, out: str | os.PathLike, **options: Any):
    """Write `model` (a loaded model, or a checkpoint folder / model name `load_model` reads) as `fmt` to `out`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {sorted(FORMATS)}")
    if isinstance(model, (str, os.PathLike)):
        model = load_model(Path(model) if isinstance(model, os.PathLike) else model)
    return FORMATS[fmt](model, out, **options)
