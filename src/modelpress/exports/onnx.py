"""ONNX exports (in progress)."""

from __future__ import annotations

from pathlib import Path

from modelpress.errors import UnsupportedError

__all__ = ["export_onnx"]


def export_onnx(model_dir: str | Path, out: str | Path) -> Path:
    raise UnsupportedError("ONNX export is not built yet")
