"""The joint search on a tiny causal LM (--metric ppl): KL-scored options, exact bytes, perplexity of each
candidate checked against a plain computation, and option type restrictions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modelpress.compress import compress
from modelpress.evaluate.size import size_report
from modelpress.formats.models import load_model
from modelpress.recipe import Recipe
from modelpress.search.joint import Budget, joint_search
from modelpress.search.space import Option, applies, default_space, is_q4_1_like
from modelpress.search.validate import make_executor
from _tiny_lm import write_tiny_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_lm("llama", tmp_path_factory.mktemp("lm") / "llama")


def model_and_windows(tiny, count: int):
    """The tiny LM, a generator seeded 0, and `count` random token windows of 16 drawn from it."""
    model = load_model(tiny)
    gen = torch.Generator().manual_seed(0)
    vocab = model.model.get_input_embeddings().num_embeddings
    return model, gen, vocab, torch.randint(3, vocab, (count, 16), generator=gen)


def plain_perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean next-token negative log-likelihood, one window per forward, by log_softmax."""
    nll = []
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=w[None], use_cache=False).logits[0].float()
            nll.append(-torch.log_softmax(logits[:-1], -1).gather(-1, w[1:, None]).squeeze(-1))
    return math.exp(float(torch.cat(nll).double().mean()))


def test_the_lm_search_scores_by_kl_and_perplexity(tiny, tmp_path, one_thread):
    model, _, _, windows = model_and_windows(tiny, 3)
    res = joint_search(model, "tiny", windows, default_space("small"), Budget(bits_per_weight=4.5),
                       str(tmp_path / "run"), lambda: make_executor("inline", None, windows, True, model=model),
                       causal=True, candidates=6, sensitivity_inputs=windows[:2])
    points = res.data["candidates"]
    assert len(points) >= 3 and res.data["metric"] == "ppl"
    for p in points:
        assert p["bytes"] == p["predicted_bytes"] and p["kl"] >= 0
    chosen = next(p for p in points if p["id"] == res.data["chosen"])
    compressed = compress(copy.deepcopy(model), Recipe.from_file(tmp_path / "run" / "chosen.yaml"))
    assert size_report(compressed).bytes == chosen["bytes"] <= res.data["budget_bytes"]
    assert chosen["perplexity"] == pytest.approx(plain_perplexity(compressed, windows), rel=1e-5)
    assert all(cell["kl"] is not None for cells in res.data["table"].values() for cell in cells.values())


def test_an_option_restricted_to_a_type_applies_only_there():
    option = Option.of("emb int3 g32", "rtn", {"bits": 3, "group_size": 32}, types=("Embedding",))
    assert applies(option, torch.nn.Embedding(10, 64)) and not applies(option, torch.nn.Linear(64, 8))
    assert not applies(Option.of("int4 g64", "rtn", {"bits": 4, "group_size": 64}), torch.nn.Linear(96, 8))
    assert Option.from_dict(option.to_dict()) == option


@pytest.mark.slow  # GPTQ in every candidate: about 15 s on a quiet machine
def test_the_llm_space_with_grouped_rows_and_gptq_on_a_tiny_lm(tiny, tmp_path, one_thread):
    """What benchmarks/search_smollm2.py runs, in miniature: the `llm` space (GPTQ act-order, tied embedding),
    one row per layer type over the blocks, GPTQ calibrated on token windows; then `llm-no-q4_1` in the same
    run folder measures nothing again, and no candidate of it holds a Q4_1-like format. Each candidate compresses
    every member of a row alike, and the chosen recipe reproduces its validated perplexity."""
    model, gen, vocab, windows = model_and_windows(tiny, 4)
    calibration = [{"input_ids": w[None]} for w in torch.randint(3, vocab, (2, 16), generator=gen)]
    groups = ["*.layers.*.self_attn.*", "*.layers.*.mlp.*"]

    def run(space):
        return joint_search(model, "tiny", windows[2:], default_space(space), Budget(bits_per_weight=5.0),
                            str(tmp_path / "run"),
                            lambda: make_executor("inline", None, windows[2:], True, calibration, model=model),
                            causal=True, calibration=calibration, candidates=5, sensitivity_inputs=windows[:2],
                            groups=groups)

    with_q4_1 = run("llm")
    assert [row["name"] for row in with_q4_1.data["layers"]] == ["model.model.embed_tokens", *groups]
    without = run("llm-no-q4_1")
    assert without.measured_options == 0
    q4_1 = {o.label for o in default_space("llm") if is_q4_1_like(o)}
    for p in without.data["candidates"]:
        assert not q4_1 & set(p["choice"].values())
    chosen = next(p for p in without.data["candidates"] if p["id"] == without.data["chosen"])
    compressed = compress(copy.deepcopy(model), without.chosen, calibration=calibration)
    assert size_report(compressed).bytes == chosen["bytes"]
    assert plain_perplexity(compressed, windows[2:]) == pytest.approx(chosen["perplexity"], rel=1e-5)
    members = next(row["members"] for row in without.data["layers"] if row["name"] == groups[1])
    assert len({getattr(compressed.get_submodule(n), "encoding", None) is None
                or compressed.get_submodule(n).encoding.describe() for n in members}) == 1
