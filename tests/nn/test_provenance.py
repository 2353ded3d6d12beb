"""Provenance: one owner for the recipe and log compress keeps with a model; checkpoints carry the recipe as
plain data and never parse it."""

from __future__ import annotations

import copy
import json

import pytest
from torch import nn

import modelpress
from modelpress.errors import FormatError
from modelpress.formats.checkpoint import MANIFEST
from modelpress.nn.provenance import Provenance, provenance, record_provenance


def test_record_and_read():
    model = nn.Linear(2, 2)
    assert provenance(model) == Provenance() and provenance(model).recipe_name is None
    record_provenance(model, {"name": "mine", "stages": []}, ["a: done"])
    assert provenance(model) == Provenance({"name": "mine", "stages": []}, ("a: done",))
    assert provenance(copy.deepcopy(model)).recipe_name == "mine"
    with pytest.raises(TypeError, match="plain data"):
        record_provenance(model, modelpress.preset("int8"))
    assert "_modelpress_provenance" in vars(model) and not hasattr(model, "modelpress_recipe")


def saved(tmp_path, recipe) -> str:
    model = modelpress.compress(nn.Sequential(nn.Linear(8, 4)), "int8")
    path = modelpress.save(model, tmp_path / "m")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["recipe"] = recipe
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_a_checkpoint_carries_the_recipe_as_data_without_parsing_it(tmp_path):
    odd = {"name": "from-the-future", "stages": [{"pass": "not-yet-invented"}], "version": 9}
    loaded = modelpress.load(saved(tmp_path, odd), model=nn.Sequential(nn.Linear(8, 4)))
    assert provenance(loaded).recipe == odd  # formats keeps it as it is; Recipe.from_dict would refuse it


@pytest.mark.parametrize("recipe", [["int8"], "int8", 3])
def test_a_recipe_that_is_not_a_mapping_is_a_format_error(tmp_path, recipe):
    with pytest.raises(FormatError, match="recipe must be a mapping"):
        modelpress.load(saved(tmp_path, recipe), model=nn.Sequential(nn.Linear(8, 4)))
