"""The joint search on the toy encoder: a front of validated candidates, exact bytes, a chosen recipe that
`compress` reproduces exactly, better than a uniform recipe at the same bytes, resumable runs, executors that
agree."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

import modelpress.search.table as table_mod
import modelpress.search.validate as validate_mod
from modelpress.compress import compress
from modelpress.errors import ConfigError
from modelpress.evaluate.fidelity import fidelity
from modelpress.evaluate.size import size_report
from modelpress.recipe import Recipe
from modelpress.search.joint import Budget, joint_search
from modelpress.search.space import allocation_recipe, default_space
from modelpress.search.validate import Validator, make_executor
from _toy_encoder import SENSITIVE, encode, toy_encoder, toy_sentences

SPACE = default_space("joint")


def uniform_int3() -> Recipe:
    """The hand-made baseline: every searchable layer at 3 bits in groups of 32."""
    model = toy_encoder()
    option = next(o for o in SPACE if o.label == "int3 g32")
    return allocation_recipe({n: option for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear,
                                                                                          torch.nn.Embedding))})


def budget_bytes() -> int:
    return size_report(compress(toy_encoder(), uniform_int3())).bytes


def search(run_dir, executor: str = "inline", jobs: int = 1, candidates: int = 10):
    model, sentences = toy_encoder(), toy_sentences()
    return joint_search(model, "toy", sentences, SPACE, Budget(total_bytes=budget_bytes()), str(run_dir),
                        lambda: make_executor(executor, toy_encoder, sentences, False, jobs=jobs, model=model),
                        candidates=candidates, sensitivity_inputs=toy_sentences(32, seed=1))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    run = tmp_path_factory.mktemp("search") / "run"
    return run, search(run)


def test_the_front_has_eight_validated_points_with_exact_bytes(result):
    _, res = result
    points = res.data["candidates"]
    assert len(points) >= 8
    assert sum(bool(p.get("front")) for p in points) >= 8
    for p in points:
        assert p["bytes"] == p["predicted_bytes"]  # bytes as stored are the options' bytes plus the fixed tensors
        assert 0.0 < p["mean_cosine"] <= 1.0
    assert res.data["chosen"] is not None
    chosen = next(p for p in points if p["id"] == res.data["chosen"])
    assert chosen["bytes"] <= res.data["budget_bytes"] == budget_bytes()
    assert res.evaluations == len(points)


def test_the_chosen_yaml_reproduces_the_search_figures_exactly(result):
    run, res = result
    recipe = Recipe.from_file(run / "chosen.yaml")
    assert recipe == res.chosen
    chosen = next(p for p in res.data["candidates"] if p["id"] == res.data["chosen"])
    model, sentences = toy_encoder(), toy_sentences()
    again = Validator(model, sentences, causal=False).validate(recipe)
    assert again["bytes"] == chosen["bytes"] and again["mean_cosine"] == chosen["mean_cosine"]
    # and against a plain reference: compress, then one forward per sentence
    compressed = compress(copy.deepcopy(model), recipe)
    assert size_report(compressed).bytes == chosen["bytes"]
    plain = fidelity(encode(model, sentences), encode(compressed, sentences), n_queries=10).mean_cosine
    assert plain == pytest.approx(chosen["mean_cosine"], abs=1e-5)


def test_the_search_beats_the_uniform_recipe_at_the_same_bytes(result):
    _, res = result
    model, sentences = toy_encoder(), toy_sentences()
    uniform = Validator(model, sentences, causal=False).validate(uniform_int3())
    chosen = next(p for p in res.data["candidates"] if p["id"] == res.data["chosen"])
    assert chosen["bytes"] <= uniform["bytes"]
    assert chosen["mean_cosine"] > uniform["mean_cosine"]
    assert res.data["table"]["int3 g32"][SENSITIVE]["damage"] > res.data["table"]["int3 g32"]["blocks.0.up"]["damage"]


def test_a_killed_search_resumes_without_recomputing(tmp_path, monkeypatch, result):
    run = tmp_path / "run"
    real_compressed, real_validate = table_mod._compressed, Validator.validate
    calls = {"options": 0, "validations": 0}

    def failing_compressed(*args):
        calls["options"] += 1
        if calls["options"] == 5:
            raise KeyboardInterrupt  # the search is killed while measuring the 5th option
        return real_compressed(*args)

    monkeypatch.setattr(table_mod, "_compressed", failing_compressed)
    with pytest.raises(KeyboardInterrupt):
        search(run)
    monkeypatch.setattr(table_mod, "_compressed", real_compressed)

    def failing_validate(self, recipe):
        calls["validations"] += 1
        if calls["validations"] == 4:
            raise KeyboardInterrupt  # killed again, while validating the 4th candidate
        return real_validate(self, recipe)

    monkeypatch.setattr(validate_mod.Validator, "validate", failing_validate)
    with pytest.raises(KeyboardInterrupt):
        second = search(run)
    monkeypatch.setattr(validate_mod.Validator, "validate", real_validate)
    third = search(run)
    _, whole = result
    measured = len(whole.data["table"])
    assert third.measured_options == 0  # every option was measured by the first two calls
    assert third.evaluations == len(whole.data["candidates"]) - 3  # three candidates were done before the kill
    assert [(p["id"], p["mean_cosine"]) for p in third.data["candidates"]] == \
        [(p["id"], p["mean_cosine"]) for p in whole.data["candidates"]]
    assert measured == len(third.data["table"])
    assert "second" not in locals()


def test_a_run_folder_refuses_another_search(result):
    run, _ = result
    model, sentences = toy_encoder(), toy_sentences()
    with pytest.raises(ConfigError, match="holds another search"):  # other validation sentences: other figures
        joint_search(model, "toy", sentences[:-1], SPACE, Budget(total_bytes=budget_bytes()), str(run),
                     lambda: make_executor("inline", toy_encoder, sentences, False, model=model),
                     sensitivity_inputs=toy_sentences(32, seed=1))


def test_another_budget_or_a_smaller_space_reuses_the_measurements(tmp_path, result, monkeypatch):
    """The table and the validated candidates are kept per option and per recipe: a run folder searched again
    at another budget, or with a subset of its space, measures nothing again and validates only new recipes."""
    run, whole = result
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    validated = []
    real = Validator.validate
    monkeypatch.setattr(validate_mod.Validator, "validate", lambda self, r: validated.append(r) or real(self, r))
    model, sentences = toy_encoder(), toy_sentences()
    space = [o for o in SPACE if o.pass_name == "rtn"]
    again = joint_search(model, "toy", sentences, space, Budget(total_bytes=int(budget_bytes() * 0.9)), str(folder),
                         lambda: make_executor("inline", toy_encoder, sentences, False, model=model),
                         candidates=10, sensitivity_inputs=toy_sentences(32, seed=1))
    assert again.measured_options == 0
    assert set(again.data["table"]) == {o.label for o in space} & set(whole.data["table"])  # g128 fits no toy layer
    for label in again.data["table"]:
        assert again.data["table"][label] == whole.data["table"][label]
    old = {p["id"]: p for p in whole.data["candidates"]}
    assert again.evaluations == len(validated) == sum(p["id"] not in old for p in again.data["candidates"])
    for p in again.data["candidates"]:
        assert all(whole_option in {o.label for o in space} | {"float"} for whole_option in p["choice"].values())
        if p["id"] in old:
            assert p["mean_cosine"] == old[p["id"]]["mean_cosine"]
    assert again.data["budget_bytes"] == int(budget_bytes() * 0.9)
    assert again.data["run"]["spec"]["budget_bytes"] == int(budget_bytes() * 0.9)


def _with_the_table_of(run, folder):
    """A fresh run folder holding `run`'s measured table only: the latencies in it are timings, which differ from
    run to run (and decide the size x fidelity x latency front), while every candidate is validated anew."""
    shutil.copytree(run / "table", folder / "table")
    shutil.copy(run / "run.json", folder / "run.json")
    return folder


def test_the_process_executor_gives_the_same_front(tmp_path, result):
    run, inline = result
    res = search(_with_the_table_of(run, tmp_path / "run"), executor="process", jobs=2)
    assert res.measured_options == 0 and res.evaluations == len(inline.data["candidates"])
    key = [(p["id"], p["bytes"], p["mean_cosine"], p.get("front")) for p in inline.data["candidates"]]
    assert [(p["id"], p["bytes"], p["mean_cosine"], p.get("front")) for p in res.data["candidates"]] == key
    assert res.data["chosen"] == inline.data["chosen"]


@pytest.mark.slow
def test_the_ray_executor_gives_the_same_front(tmp_path, result, monkeypatch):
    import ray  # noqa: PLC0415 - the optional `ray` extra, which the dev extra (and so CI) installs: no skip
    run, inline = result
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a local cluster of this test only: no token file
    tests = str(Path(__file__).resolve().parents[1])  # the workers import the toy encoder's module from there
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests}})
    try:
        res = search(_with_the_table_of(run, tmp_path / "run"), executor="ray", jobs=2)
    finally:
        ray.shutdown()
    assert res.measured_options == 0 and res.evaluations == len(inline.data["candidates"])
    key = [(p["id"], p["bytes"], p["mean_cosine"], p.get("front")) for p in inline.data["candidates"]]
    assert [(p["id"], p["bytes"], p["mean_cosine"], p.get("front")) for p in res.data["candidates"]] == key


def test_budgets_are_checked():
    with pytest.raises(ConfigError, match="exactly one budget"):
        Budget().layer_bytes(0, 10)
    with pytest.raises(ConfigError, match="below what the model keeps unsearched"):
        Budget(total_bytes=100).layer_bytes(200, 10)
    assert Budget(bits_per_weight=4).layer_bytes(0, 10) == 5


def test_table_cells_match_a_plain_single_layer_computation(result):
    """Each cell's damage is 1 - mean cosine of the model with that layer alone compressed, one forward per
    sentence; its bytes are the layer's encoding's."""
    _, res = result
    model, sentences = toy_encoder(), toy_sentences(32, seed=1)  # the sentences the table was measured on
    reference = encode(model, sentences)
    for label in ("int3 g32", "2:4+int4", "rank50%+int4"):
        option = next(o for o in SPACE if o.label == label)
        for name in (SENSITIVE, "blocks.0.down"):
            alone = compress(copy.deepcopy(model), Recipe((option.stage([name]),)))
            cell = res.data["table"][label][name]
            plain = fidelity(reference, encode(alone, sentences), n_queries=10).mean_cosine
            assert cell["damage"] == pytest.approx(1.0 - plain, abs=1e-5)
            assert cell["bytes"] == alone.get_submodule(name).encoding.nbytes


def test_grouped_layers_are_searched_as_one_row(tmp_path):
    """A group's cell is every member compressed together in the float model (one forward, the members' bytes
    summed), and every member of a group takes the same option in every candidate."""
    model, sentences = toy_encoder(), toy_sentences()
    groups = ["blocks.*.up", "blocks.[01].down"]
    space = [o for o in SPACE if o.label in ("int3 g32", "int4 g32", "int8 ch")]
    budget = Budget(total_bytes=int(budget_bytes() * 1.2))
    res = joint_search(model, "toy", sentences, space, budget, str(tmp_path / "run"),
                       lambda: make_executor("inline", toy_encoder, sentences, False, model=model),
                       candidates=6, sensitivity_inputs=toy_sentences(32, seed=1), groups=groups)
    rows = {row["name"]: row for row in res.data["layers"]}
    assert rows["blocks.*.up"]["members"] == ["blocks.0.up", "blocks.1.up", "blocks.2.up"]
    assert rows["blocks.[01].down"]["members"] == ["blocks.0.down", "blocks.1.down"]
    assert "blocks.2.down" in rows and "members" not in rows["blocks.2.down"]
    option = space[0]
    members = rows["blocks.*.up"]["members"]
    alone = compress(copy.deepcopy(model), Recipe((option.stage(members),)))
    cell = res.data["table"][option.label]["blocks.*.up"]
    reference = encode(model, toy_sentences(32, seed=1))
    plain = fidelity(reference, encode(alone, toy_sentences(32, seed=1)), n_queries=10).mean_cosine
    assert cell["damage"] == pytest.approx(1.0 - plain, abs=1e-5)
    assert cell["bytes"] == sum(alone.get_submodule(n).encoding.nbytes for n in members)
    for p in res.data["candidates"]:
        recipe = Recipe.from_file(tmp_path / "run" / "candidates" / p["id"] / "recipe.yaml")
        compressed = compress(toy_encoder(), recipe)
        for row in rows.values():
            described = {getattr(compressed.get_submodule(n), "encoding", None) is None
                         or compressed.get_submodule(n).encoding.describe() for n in row.get("members", [row["name"]])}
            assert len(described) == 1, (row["name"], described)  # one option for the whole group
