"""Perplexity against transformers' own loss, agreement, and the held-out text splits."""

from __future__ import annotations

import math

import pytest
import torch

from modelpress.data.text import reference_text
from modelpress.errors import ConfigError
from modelpress.evaluate.perplexity import agreement, score_language_model, token_windows

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_nll_is_transformers_mean_loss(tiny_llama):
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(1))
    windows = token_windows(ids, window=40, max_tokens=200)
    score = score_language_model(tiny_llama, windows, batch_size=2)
    with torch.inference_mode():
        losses = [float(tiny_llama(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert windows.shape == (5, 40)
    assert score.tokens == 5 * 39
    assert score.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(score.nll))
    assert agreement(score, score) == 1.0


def test_agreement_counts_matching_argmax(tiny_llama):
    windows = token_windows(torch.arange(60) % 97, window=30, max_tokens=60)
    ref = score_language_model(tiny_llama, windows)
    flipped = ref.predictions.clone()
    flipped[0, :29] = (flipped[0, :29] + 1) % 97
    other = type(ref)(ref.nll, ref.tokens, flipped)
    assert agreement(ref, other) == pytest.approx(29 / 58)


@pytest.mark.parametrize("ids, window, match", [
    (torch.arange(10), 20, "fewer than one window"),
    (torch.arange(10), 1, "at least 2"),
    (torch.zeros(2, 5, dtype=torch.long), 2, "one sequence"),
])
def test_bad_windows_are_config_errors(ids, window, match):
    with pytest.raises(ConfigError, match=match):
        token_windows(ids, window=window)


def test_text_splits_are_disjoint_prose():
    dev, heldout = reference_text("dev"), reference_text("heldout")
    assert len(dev.split()) > 12_000 and len(heldout.split()) > 12_000
    dev_paragraphs = set(dev.split("\n\n"))
    shared = [p for p in heldout.split("\n\n") if p in dev_paragraphs and len(p) > 40]
    assert not shared
    assert "::=" not in heldout  # grammar productions are indented and dropped
    with pytest.raises(ConfigError, match="not one of"):
        reference_text("test")
