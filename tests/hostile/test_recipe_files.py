"""Hostile recipe files: bombs, deep nesting, huge numbers, files that are not files, and documents
of the wrong shape end in one RecipeError or LimitExceededError, from the library and from the CLI."""

from __future__ import annotations

import os

import pytest
from _tiny_source import with_deadline

from modelpress.cli import EXIT_USER_ERROR, main
from modelpress.errors import LimitExceededError, RecipeError
from modelpress.limits import MAX_RECIPE_BYTES, MAX_YAML_NODES
from modelpress.recipe import Recipe


def alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\nstages: [{pass: rtn}]\n"


def _file(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


@pytest.mark.parametrize("text, error, match", [
    (alias_bomb(), LimitExceededError, f"expands to more than {MAX_YAML_NODES} nodes"),
    ("stages: " + "[" * 10_000 + "]" * 10_000, LimitExceededError, "levels deep"),
    ("stages:\n" + "".join("  " * i + "- \n" for i in range(1, 200)), LimitExceededError, "levels deep"),
    ("a: &a [*a]\nstages: [{pass: rtn}]", RecipeError, "recursive"),
    ("stages: [{pass: rtn, config: {bits: " + "8" * 5000 + "}}]", RecipeError, "integer of 5000 digits"),
    ("!!python/object/apply:os.system [echo pwned]", RecipeError, "not valid YAML"),
    ("stages: [\n", RecipeError, "not valid YAML"),
    ("--- {stages: [{pass: rtn}]}\n--- {stages: [{pass: rtn}]}\n", RecipeError, "not valid YAML"),
    ("- pass: rtn\n", RecipeError, "a recipe must be a mapping"),
    ("just text", RecipeError, "a recipe must be a mapping"),
    ("", RecipeError, "a recipe must be a mapping"),
    ("stages: [{pass: rtn}]\nextra: 1\n", RecipeError, "unknown recipe field"),
    ("stages: [{pass: rtn, confg: {}}]", RecipeError, "unknown field"),
    ("stages: [{pass: rtn, config: {bitz: 4}}]", RecipeError, "unknown field"),
    ("stages: {pass: rtn}", RecipeError, "non-empty list"),
    ("stages: [rtn]", RecipeError, "each stage must be a mapping"),
    ("stages: [{pass: [rtn]}]", RecipeError, "unknown pass"),
    ("stages: [{pass: rtn, config: [4]}]", RecipeError, "config must be a mapping"),
    ("stages: [{pass: rtn, config: {bits: [4]}}]", RecipeError, "bit width"),
    ("stages: [{pass: rtn, config: {bits: .nan}}]", RecipeError, "bit width"),
    ("stages: [{pass: rtn, targets: {include: [1]}}]", RecipeError, "list of strings"),
    ("stages: [{pass: rtn, overrides: [1]}]", RecipeError, "overrides must map"),
    ("stages: [{pass: rtn, optional: yes please}]", RecipeError, "optional must be true or false"),
    ("version: [1]\nstages: [{pass: rtn}]", RecipeError, "recipe version"),
    ("name: [1]\nstages: [{pass: rtn}]", RecipeError, "is not a name"),
    ("name: 4\nstages: [{pass: rtn}]", RecipeError, "is not a name"),
    ("? [a, b]\n: 1\nstages: [{pass: rtn}]", RecipeError, "not valid YAML"),
])
def test_hostile_recipe_text(tmp_path, text, error, match):
    with pytest.raises(error, match=match):
        Recipe.from_yaml(text)
    with pytest.raises(error, match=match):
        Recipe.from_file(_file(tmp_path, text))


def test_an_oversized_recipe_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as fh:
        fh.truncate(MAX_RECIPE_BYTES + 1)
    with pytest.raises(LimitExceededError, match="more than the"):
        Recipe.from_file(path)


def test_a_recipe_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "r.yaml")
    with pytest.raises(RecipeError, match="not a regular file"):
        with_deadline(lambda: Recipe.from_file(tmp_path / "r.yaml"), timeout=30)


def test_a_recipe_file_linked_to_a_device_is_refused(tmp_path):
    (tmp_path / "r.yaml").symlink_to("/dev/zero")
    with pytest.raises(RecipeError, match="not a regular file"):
        Recipe.from_file(tmp_path / "r.yaml")


def test_a_non_utf8_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not UTF-8"):
        Recipe.from_file(_file(tmp_path, b"name: caf\xe9\nstages: [{pass: rtn}]\n"))


@pytest.mark.parametrize("text, match", [
    (alias_bomb(), "expands to more than"),
    ("stages: " + "[" * 10_000 + "]" * 10_000, "levels deep"),
    ("[1, 2]", "a recipe must be a mapping"),
])
def test_the_cli_prints_one_line_and_loads_nothing(capsys, tmp_path, text, match):
    code = main(["compress", "minilm", "--recipe", _file(tmp_path, text), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelpress: error: ") and match in lines[0], err
    assert not (tmp_path / "o").exists()


def test_a_valid_recipe_with_anchors_still_loads(tmp_path):
    text = ("stages:\n  - pass: rtn\n    config: &q {bits: 8, symmetric: true}\n"
            "  - pass: rtn\n    targets: {types: [Embedding]}\n    config: *q\n")
    recipe = Recipe.from_file(_file(tmp_path, text))
    assert [s.config.quant.bits for s in recipe.stages] == [8, 8]
