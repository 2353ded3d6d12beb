"""The package root only re-exports, with an explicit __all__; the core imports nothing the core does not install."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import modelpress


def test_every_name_in_all_exists_and_nothing_else_is_public_by_accident():
    assert all(hasattr(modelpress, name) for name in modelpress.__all__)
    assert len(set(modelpress.__all__)) == len(modelpress.__all__)
    for name in ("compress", "GPTQConfig", "WeightQuant", "Store", "preset", "preset_names", "Recipe", "provenance",
                 "calibration_sentences", "load", "save"):
        assert name in modelpress.__all__
    for old in ("PRESETS", "resolve_recipe"):  # one way into presets: preset(name) / preset_names()
        assert old not in modelpress.__all__


def test_the_readme_imports_work():
    from modelpress import GPTQConfig, Store  # noqa: F401

    assert modelpress.Store.__module__ == "modelpress.store.store"


def run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_importing_modelpress_and_the_pipeline_imports_neither_scikit_learn_nor_the_demos():
    run("import sys, modelpress, modelpress.pipelines.deep_compression, modelpress.search, modelpress.cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'digits', 'demos')); "
        "assert not bad, bad; assert not any(m.startswith('modelpress.models') for m in sys.modules)")


FORBIDDEN = ("modelpress.passes", "modelpress.calibration", "modelpress.compress", "modelpress.presets",
             "modelpress.recipe")


def test_formats_never_imports_an_algorithm_directly():
    """The direct half of pyproject's second import-linter contract (lint-imports checks the indirect half)."""
    root = Path(modelpress.__file__).parent
    for file in sorted((root / "formats").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith(FORBIDDEN)]
            assert not bad, f"{file.name} imports {bad}"
