"""Compressed models out to the runtimes people deploy with: `export_model(model, fmt, out)`.

One table, format name -> writer. Each writer takes the model (loaded, or a checkpoint folder / any
source `load_model` reads) and the output path, plus its own options. A model a format cannot hold is
refused with one line naming what is missing and the nearest thing that works.

    gguf   Llama-family causal LMs, for llama.cpp (exports/gguf.py): returns a GGUFExport record
    onnx   sentence encoders and causal LMs, for ONNX Runtime (exports/onnx.py): returns the folder
    hf     Hugging Face folders for transformers / sentence-transformers (exports/hf.py): returns the folder
    gptq   GPTQ-format Hugging Face folders of causal LMs, codes as they are (exports/gptq.py): returns the folder
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from modelpress.errors import ConfigError
from modelpress.exports.gguf import GGUFExport, export_gguf
from modelpress.exports.gptq import export_gptq
from modelpress.exports.hf import export_hf
from modelpress.exports.onnx import export_onnx
from modelpress.formats.models import load_model

__all__ = ["FORMATS", "GGUFExport", "export_gguf", "export_gptq", "export_hf", "export_model", "export_onnx"]


def _gguf(model: nn.Module | str | os.PathLike, out: str | os.PathLike, **options: Any) -> GGUFExport:
    if isinstance(model, (str, os.PathLike)):
        model = load_model(Path(model) if isinstance(model, os.PathLike) else model)
    return export_gguf(model, out, **options)


FORMATS: dict[str, Callable[..., Any]] = {"gguf": _gguf, "onnx": export_onnx, "hf": export_hf, "gptq": export_gptq}


def export_model(model: nn.Module | str | os.PathLike, fmt: str, out: str | os.PathLike, **options: Any):
    """Write `model` (a loaded model, or a checkpoint folder / model name `load_model` reads) as `fmt` to `out`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {sorted(FORMATS)}")
    return FORMATS[fmt](model, out, **options)
