"""Exports to the runtimes users deploy with: `export_model(model_dir, fmt, out, **options)`.

MINIMAL VERSION (branch wt-onnx-hf): the gguf helper's branch creates this file with the same shape and a
table holding "gguf"; the lead merges both tables into one. Each exporter is a function
(model_dir, out, **options) -> the path written.
"""

from __future__ import annotations

from pathlib import Path

from modelpress.errors import ConfigError
from modelpress.exports.hf import export_hf
from modelpress.exports.onnx import export_onnx

__all__ = ["EXPORTERS", "export_model"]

EXPORTERS = {"onnx": export_onnx, "hf": export_hf}


def export_model(model_dir: str | Path, fmt: str, out: str | Path, **options) -> Path:
    """Write the model of `model_dir` (a modelpress checkpoint, or any source load_model reads) in format `fmt`."""
    if fmt not in EXPORTERS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {sorted(EXPORTERS)}")
    return EXPORTERS[fmt](model_dir, out, **options)
