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
from modelpress.search.space import Option, applies, default_space
from modelpress.search.validate import make_executor
from _tiny_lm import write_tiny_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_lm("llama", tmp_path_factory.mktemp("lm") / "llama")


def plain_perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean next-token negative log-likelihood, one window per forward, by log_softmax."""
    nll = []
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=w[None], use_cache=False).logits[0].float()
            nll.append(-torch.log_softmax(logits[:-1], -1).gather(-1, w[1:, None]).squeeze(-1))
    return math.exp(float(torch.cat(nll).double().mean()))


def test_the_lm_search_scores_by_kl_and_perplexity(tiny, tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model(tiny)
        gen = torch.Generator().manual_seed(0)
        vocab = model.model.get_input_embeddings().num_embeddings
        windows = torch.randint(3, vocab, (3, 16), generator=gen)
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
    finally:
        torch.set_num_threads(previous)


def test_an_option_restricted_to_a_type_applies_only_there():
    option = Option.of("emb int3 g32", "rtn", {"bits": 3, "group_size": 32}, types=("Embedding",))
    assert applies(option, torch.nn.Embedding(10, 64)) and not applies(option, torch.nn.Linear(64, 8))
    assert not applies(Option.of("int4 g64", "rtn", {"bits": 4, "group_size": 64}), torch.nn.Linear(96, 8))
    assert Option.from_dict(option.to_dict()) == option
