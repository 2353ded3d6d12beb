"""A search's run folder: everything needed to reproduce, resume and report it, as JSON and YAML.

    RUN/run.json                   what the figures depend on: model, metric, seed, inputs' hashes, versions (the
                                   budget and the space may change between runs of one folder)
    RUN/table/<option>.json        each option's measured cells (layer -> encoding, bytes, damage, latency)
    RUN/candidates/<id>/recipe.yaml  a candidate recipe (id: the first 16 hex digits of its YAML's sha256)
    RUN/candidates/<id>/figures.json its end-to-end figures, written when it has been validated
    RUN/search.json                the result: layers, table, candidates, front, chosen (the report reads it)
    RUN/chosen.yaml                the chosen recipe: `modelpress compress --recipe RUN/chosen.yaml`

Every file is written atomically (a whole temporary, fsynced, renamed), so a search killed at any point
leaves whole files only; a resumed search takes every table file and figures file as done.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from pathlib import Path
from typing import Any

import torch

from modelpress import fileio
from modelpress._version import __version__
from modelpress.errors import ConfigError
from modelpress.limits import MAX_RECIPE_BYTES
from modelpress.recipe import Recipe
from modelpress.safeparse import load_json
from modelpress.search.space import Option
from modelpress.search.table import Cell

__all__ = ["RunFolder", "recipe_id", "versions"]

MAX_RUN_JSON_BYTES = 64 << 20


def versions() -> dict[str, str]:
    return {"modelpress": __version__, "torch": torch.__version__, "python": platform.python_version()}


def recipe_id(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16]


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label) + "-" + hashlib.sha256(label.encode()).hexdigest()[:8]


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---------------------------------------------------------------------------- writing and reading

    def _write_json(self, rel: str, data: Any) -> None:
        target = self.path / rel
        fileio.make_dirs(target.parent)
        fileio.write_file(target, json.dumps(data, indent=1, sort_keys=True).encode())

    def _read_json(self, rel: str) -> Any:
        what = f"run file {str(self.path / rel)!r}"
        data = fileio.read_file(self.path / rel, MAX_RUN_JSON_BYTES, what)
        return load_json(data, what, MAX_RUN_JSON_BYTES, hint="remove the damaged file to measure it again",
                         error=ConfigError)

    def exists(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    # ---------------------------------------------------------------------------- the search's identity

    def start(self, spec: dict[str, Any]) -> bool:
        """Record `spec` (what is searched) in run.json; True when resuming a run of the same spec. A folder
        holding another search is refused."""
        if self.exists("run.json"):
            held = self._read_json("run.json")
            if held.get("spec") != spec:
                changed = sorted(k for k in spec.keys() | held.get("spec", {}).keys()
                                 if spec.get(k) != held.get("spec", {}).get(k))
                raise ConfigError(f"{str(self.path)!r} holds another search (it differs in {changed}): give a new "
                                  "--out, or the same settings to resume it")
            return True
        fileio.make_dirs(self.path)
        self._write_json("run.json", {"spec": spec, "versions": versions()})
        return False

    def run_info(self) -> dict[str, Any]:
        return self._read_json("run.json")

    # ---------------------------------------------------------------------------- measurements

    def save_option(self, option: Option, cells: dict[str, Cell]) -> None:
        self._write_json(f"table/{_safe(option.label)}.json", {"label": option.label, "option": option.to_dict(),
                                                               "cells": {k: c.to_dict() for k, c in cells.items()}})

    def load_options(self, options: list[Option]) -> dict[str, dict[str, Cell]]:
        """The cells of every option of `options` measured before (the same label and the same config)."""
        out = {}
        for option in options:
            rel = f"table/{_safe(option.label)}.json"
            if self.exists(rel):
                data = self._read_json(rel)
                if data.get("option") == option.to_dict():
                    out[option.label] = {k: Cell.from_dict(v) for k, v in data["cells"].items()}
        return out

    # ---------------------------------------------------------------------------- candidates

    def save_candidate(self, recipe: Recipe) -> str:
        cid = recipe_id(recipe)
        rel = self.path / "candidates" / cid / "recipe.yaml"
        if not rel.is_file():
            fileio.make_dirs(rel.parent)
            fileio.write_file(rel, recipe.to_yaml().encode())
        return cid

    def candidate_recipe(self, cid: str) -> Recipe:
        return Recipe.from_file(self.path / "candidates" / cid / "recipe.yaml")

    def save_figures(self, cid: str, figures: dict[str, Any]) -> None:
        self._write_json(f"candidates/{cid}/figures.json", figures)

    def figures(self, cid: str) -> dict[str, Any] | None:
        rel = f"candidates/{cid}/figures.json"
        return self._read_json(rel) if self.exists(rel) else None

    # ---------------------------------------------------------------------------- results

    def save_result(self, result: dict[str, Any], chosen: Recipe | None) -> None:
        self._write_json("search.json", result)
        if chosen is not None:
            text = chosen.to_yaml().encode()
            if len(text) > MAX_RECIPE_BYTES:
                raise ConfigError("the chosen recipe is larger than a recipe file may be: search fewer layers")
            fileio.write_file(self.path / "chosen.yaml", text)

    def result(self) -> dict[str, Any]:
        if not self.exists("search.json"):
            raise ConfigError(f"{str(self.path)!r} holds no finished search (no search.json): run modelpress "
                              "search again with the same --out to finish it")
        return self._read_json("search.json")
