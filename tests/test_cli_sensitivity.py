"""`modelpress sensitivity`: the per-layer table, the mixed-precision recipe it writes, and one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

import modelpress.cli.model_cmds as cli
from modelpress.cli import EXIT_USER_ERROR, main
from modelpress.compress import compress
from modelpress.recipe import Recipe
from _toy_encoder import LAYERS, SENSITIVE, toy_encoder, toy_sentences  # the toy encoder, one sensitive layer

def rtn4_recipe(name: str, linear_group: int, embedding_group: int) -> str:
    """A YAML recipe: min-max 4-bit asymmetric RTN on Linear and Embedding layers, groups as given."""
    stages = "".join(f"""  - pass: rtn
    targets: {{types: [{types}]}}
    config: {{bits: 4, symmetric: false, group_size: {group}, search: minmax}}
""" for types, group in (("Linear", linear_group), ("Embedding", embedding_group)))
    return f"name: {name}\nstages:\n{stages}"


TOY_RECIPE = rtn4_recipe("toy4", 16, 32)
# The int4 preset's shape with min-max ranges: its MSE range search would spend minutes re-quantising
# MiniLM's 40 layers for the per-layer table without testing anything more.
MINILM_RECIPE = rtn4_recipe("minilm4", 32, 64)


@pytest.fixture
def toy(monkeypatch):
    """`modelpress sensitivity toy` loads the toy encoder instead of a folder, and its own sentences (the
    corpus takes seconds to parse; the MiniLM test below reads it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting on a shared machine
    monkeypatch.setattr(cli, "_load_original", lambda name: toy_encoder())
    monkeypatch.setattr(cli, "_eval_sentences", toy_sentences)
    yield
    torch.set_num_threads(previous)


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modelpress: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _bits_per_weight(model, names) -> float:
    encodings = [model.get_submodule(n).encoding for n in names]
    return 8.0 * sum(e.nbytes for e in encodings) / sum(e.numel for e in encodings)


def test_table_lists_every_layer_most_damaging_first(capsys, tmp_path, toy):
    (tmp_path / "r.yaml").write_text(TOY_RECIPE)
    code, out, err = _run(capsys, "sensitivity", "toy", "--recipe", str(tmp_path / "r.yaml"), "--sentences", "40")
    assert code == 0, err
    assert "most damaging first (40 sentences)" in out
    for col in ("layer", "bits", "mean cos", "overlap@10", "bytes", "saved"):
        assert col in out
    body = [line for line in out.splitlines() if any(f" {name} " in line for name in LAYERS)]
    assert len(body) == len(LAYERS)
    assert f" {SENSITIVE} " in body[0] and "int4 asym g16" in body[0]
    assert "all layers" in out and "bits/weight" in out
    assert "mixed precision" not in out


def test_budget_writes_a_recipe_that_fits_it(capsys, tmp_path, toy):
    (tmp_path / "r.yaml").write_text(TOY_RECIPE)
    out_path = tmp_path / "mixed.yaml"
    code, out, err = _run(capsys, "sensitivity", "toy", "--recipe", str(tmp_path / "r.yaml"), "--sentences", "40",
                          "--budget", "6.5", "--write-recipe", str(out_path))
    assert code == 0, err
    assert "mixed precision within 6.5 bits per weight" in out and f"{SENSITIVE}: int4 asym g16 -> int8" in out
    recipe = Recipe.from_file(out_path)
    assert recipe.name == "toy4-mixed"
    model = compress(copy.deepcopy(toy_encoder()), recipe)
    assert _bits_per_weight(model, LAYERS) <= 6.5
    assert model.get_submodule(SENSITIVE).encoding.scheme.bits == 8


def test_a_budget_below_the_recipe_prints_the_table_then_one_error(capsys, tmp_path, toy):
    (tmp_path / "r.yaml").write_text(TOY_RECIPE)
    code, out, err = _run(capsys, "sensitivity", "toy", "--recipe", str(tmp_path / "r.yaml"), "--sentences", "20",
                          "--budget", "4", "--write-recipe", str(tmp_path / "m.yaml"))
    assert code == EXIT_USER_ERROR
    assert SENSITIVE in out
    _one_line_error(err, "over the budget of 4.000", "raise the budget")
    assert not (tmp_path / "m.yaml").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--sentences", "5"], ("--sentences 5 is too few", "at least 11")),
    (["--write-recipe", "x.yaml"], ("--write-recipe needs --budget",)),
    (["--budget", "0"], ("--budget 0 is not valid",)),
    (["--budget", "-3"], ("--budget -3 is not valid",)),
    (["--recipe", "int5"], ("unknown preset 'int5'",)),
])
def test_bad_arguments_fail_before_loading_the_model(capsys, monkeypatch, args, fragments):
    monkeypatch.setattr(cli, "_load_original", lambda name: pytest.fail("the model was loaded"))
    code, _, err = _run(capsys, "sensitivity", "minilm", *args)
    assert code == EXIT_USER_ERROR
    _one_line_error(err, *fragments)


def test_an_existing_recipe_file_is_not_overwritten(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load_original", lambda name: pytest.fail("the model was loaded"))
    (tmp_path / "m.yaml").write_text("keep me")
    code, _, err = _run(capsys, "sensitivity", "minilm", "--budget", "5", "--write-recipe", str(tmp_path / "m.yaml"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "already exists", "--write-recipe")
    assert (tmp_path / "m.yaml").read_text() == "keep me"


@pytest.mark.slow
def test_minilm_int4_report_and_mixed_recipe(capsys, tmp_path):
    (tmp_path / "int4.yaml").write_text(MINILM_RECIPE)
    out_path = tmp_path / "mixed.yaml"
    code, out, err = _run(capsys, "sensitivity", "minilm", "--recipe", str(tmp_path / "int4.yaml"), "--sentences",
                          "16", "--budget", "5.5", "--write-recipe", str(out_path))  # 16: the suite's time
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("│ model.")]
    assert len(rows) == 40  # 37 Linear + 3 Embedding layers
    assert all("int4 asym" in row for row in rows)
    assert "model.pooler.dense" in rows[-1]  # unused by mean pooling: no damage at all
    assert "mixed precision within 5.5 bits per weight" in out
    from modelpress.formats.hf import load_sentence_encoder

    model = compress(load_sentence_encoder("minilm"), Recipe.from_file(out_path))
    names = [n for n, m in model.named_modules() if hasattr(m, "encoding")]
    assert len(names) == 40 and _bits_per_weight(model, names) <= 5.5
