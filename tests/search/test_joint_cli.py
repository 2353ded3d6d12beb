"""`modelpress search`, `modelpress report` and `modelpress store report` on the toy encoder: the run folder, the
chosen YAML that `compress` reproduces, the front table, one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import modelpress.cli.search_cmds as cli
import modelpress.search.validate as validate_mod
from modelpress.cli import EXIT_USER_ERROR, main
from modelpress.compress import compress
from modelpress.evaluate.size import size_report
from modelpress.formats.checkpoint import load
from modelpress.formats.models import load_model
from modelpress.search.lm_sensitivity import next_token_kl
from modelpress.recipe import Recipe
from modelpress.search.validate import Validator
from modelpress.store import Store
from _tiny_lm import write_tiny_lm
from _toy_encoder import toy_encoder, toy_sentences


@pytest.fixture
def toy(monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(cli, "_load_original", lambda name: toy_encoder())
    monkeypatch.setattr(cli, "_factory", lambda name: toy_encoder)  # worker processes build the toy
    monkeypatch.setattr(cli, "_sentences", lambda v, s: (toy_sentences(), toy_sentences(32, seed=1)))
    yield
    torch.set_num_threads(previous)


def _one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelpress: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_search_command_writes_a_run_folder_and_a_reproducible_recipe(toy, tmp_path, capsys):
    run, html = tmp_path / "run", tmp_path / "r.html"
    budget_mb = size_report(toy_encoder()).bytes / 6 / 1e6
    code = main(["search", "toy", "--budget-mb", f"{budget_mb}", "--out", str(run), "--executor", "inline",
                 "--space", "small", "--candidates", "8", "--report", str(html)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "validated candidates" in out and "chosen recipe" in out and html.is_file()
    data = json.loads((run / "search.json").read_text())
    assert data["run"]["spec"]["space"][0]["label"] == "int2 g64"
    assert {"modelpress", "torch", "python"} <= set(data["run"]["versions"])
    ids = {p["id"] for p in data["candidates"]}
    assert {d.name for d in (run / "candidates").iterdir()} == ids
    chosen = next(p for p in data["candidates"] if p["id"] == data["chosen"])
    recipe = Recipe.from_file(run / "chosen.yaml")
    again = Validator(toy_encoder(), toy_sentences(), causal=False).validate(recipe)
    assert (again["bytes"], again["mean_cosine"]) == (chosen["bytes"], chosen["mean_cosine"])
    assert size_report(compress(copy.deepcopy(toy_encoder()), recipe)).bytes == chosen["bytes"] <= budget_mb * 1e6
    # a second run on the same folder measures and validates nothing again
    assert main(["search", "toy", "--budget-mb", f"{budget_mb}", "--out", str(run), "--executor", "inline",
                 "--space", "small", "--candidates", "8"]) == 0
    assert json.loads((run / "search.json").read_text())["candidates"] == data["candidates"]


def test_search_command_groups_rows_and_calibrates_its_table_apart(toy, tmp_path, capsys, monkeypatch):
    """--group makes one row of the layers a pattern matches; --sensitivity-calibration N hands the table N
    calibration sentences and the candidates --calibration's, both recorded (hashed) in run.json."""
    seen = []
    real = cli.joint_search
    monkeypatch.setattr(cli, "joint_search", lambda *a, **k: seen.append(k) or real(*a, **k))
    run = tmp_path / "run"
    budget_mb = size_report(toy_encoder()).bytes / 5 / 1e6
    assert main(["search", "toy", "--budget-mb", f"{budget_mb}", "--out", str(run), "--executor", "inline",
                 "--space", "small", "--candidates", "4", "--group", "blocks.*.up", "--group", "blocks.*.down",
                 "--calibration", "16", "--sensitivity-calibration", "8"]) == 0, capsys.readouterr().err
    (kwargs,) = seen
    assert len(kwargs["calibration"]) == 16 and len(kwargs["sensitivity_calibration"]) == 8
    assert kwargs["groups"] == ["blocks.*.up", "blocks.*.down"]
    data = json.loads((run / "search.json").read_text())
    rows = {row["name"]: row.get("members") for row in data["layers"]}
    assert rows["blocks.*.up"] == ["blocks.0.up", "blocks.1.up", "blocks.2.up"] and "blocks.0.up" not in rows
    spec = json.loads((run / "run.json").read_text())["spec"]
    assert spec["groups"] == ["blocks.*.up", "blocks.*.down"]
    assert spec["calibration_sha256"] != spec["sensitivity_calibration_sha256"]


def test_search_errors_are_one_line(toy, tmp_path, capsys):
    assert main(["search", "toy", "--budget-mb", "1", "--metric", "ppl", "--out", str(tmp_path / "a")]) == \
        EXIT_USER_ERROR
    _one_line_error(capsys.readouterr().err, "--metric ppl", "--metric cos")
    assert main(["search", "toy", "--budget-mb", "0.001", "--out", str(tmp_path / "b"), "--executor", "inline"]) == \
        EXIT_USER_ERROR
    _one_line_error(capsys.readouterr().err, "budget")
    assert main(["search", "toy", "--budget-mb", "1", "--out", str(tmp_path / "c"), "--space", "small",
                 "--options", "int4 g64,int5 g7"]) == EXIT_USER_ERROR
    _one_line_error(capsys.readouterr().err, "'int5 g7' is not in the small space")
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")]) == EXIT_USER_ERROR
    _one_line_error(capsys.readouterr().err, "neither a search run folder nor a checkpoint")


def test_store_report_command(tmp_path, capsys):
    with Store.init(tmp_path / "store") as store:
        store.put({"w": torch.ones(64)}, "m", message="one")
    out = tmp_path / "s.html"
    assert main(["store", "report", str(tmp_path / "store"), "--out", str(out)]) == 0
    assert "plot-added" in out.read_text()


def test_compress_with_the_chosen_yaml_reproduces_an_lm_search_exactly(tmp_path, capsys):
    """The real commands on a tiny Llama folder: `search --metric ppl`, then `compress --recipe chosen.yaml`;
    the saved checkpoint has the search's bytes and, on the search's validation windows, its KL and perplexity
    to the bit."""
    folder = write_tiny_lm("llama", tmp_path / "llama")
    run, out = tmp_path / "run", tmp_path / "ckpt"
    previous = torch.get_num_threads()
    try:
        assert main(["search", str(folder), "--metric", "ppl", "--bits-per-weight", "5", "--windows", "2",
                     "--window", "48", "--space", "small", "--executor", "inline", "--candidates", "4",
                     "--out", str(run)]) == 0
        assert main(["compress", str(folder), "--recipe", str(run / "chosen.yaml"), "--out", str(out)]) == 0
        capsys.readouterr()
        data = json.loads((run / "search.json").read_text())
        chosen = next(p for p in data["candidates"] if p["id"] == data["chosen"])
        original = load_model(folder)
        windows = cli.dev_windows(original, 2, 48)[1:]  # the validation half
        validator = Validator(original, windows, causal=True)
        got = validator.validate(Recipe.from_file(run / "chosen.yaml"))
        loaded = load(out)
        assert size_report(loaded).bytes == chosen["bytes"] == got["bytes"]
        with validate_mod._Threads(1):
            outputs = validator._outputs(loaded)
        assert next_token_kl(validator.reference, outputs) == chosen["kl"] == got["kl"]
        assert got["perplexity"] == chosen["perplexity"]
    finally:
        torch.set_num_threads(previous)
