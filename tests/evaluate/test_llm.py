"""The causal-LM evaluation: every figure recomputed from plain references (perplexity from
score_language_model, continuations from transformers' generate), the report's rows and JSON,
and the shared table rendering."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from modelpress.data.text import reference_text
from modelpress.errors import ConfigError
from modelpress.evaluate.llm import DEFAULT_PROMPTS, GenerationAgreement, evaluate_causal_lm
from modelpress.evaluate.perplexity import score_language_model, token_windows
from modelpress.evaluate.report import report_table

transformers = pytest.importorskip("transformers")

VOCAB = 128


class CharTokenizer:
    """Characters as ids (ASCII; anything else maps to 0), an end-of-sequence id, optionally a chat template."""

    eos_token_id = 3

    def __init__(self, chat: bool = False):
        self.chat_template = "<chat>" if chat else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) if ord(c) < VOCAB else 0 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def tiny_llama(seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def generate(model, ids: list[int], n: int, stop: list[int]) -> list[int]:
    """transformers' own greedy generate, ending at a stop id."""
    prompt = torch.tensor([ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         eos_token_id=stop, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def pair():
    """A tiny Llama and another one (the candidate: random models of different seeds continue differently)."""
    return tiny_llama(), tiny_llama(seed=1)


def test_every_figure_matches_its_reference(pair):
    reference, candidate = pair
    tokenizer = CharTokenizer()
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    result = evaluate_causal_lm(reference, candidate, tokenizer, windows=3, window=48, prompts=prompts,
                                new_tokens=10, measure_speed=False)
    windows = token_windows(torch.tensor(tokenizer.encode(reference_text("heldout"))), 48, 3 * 48)
    ref_score, cand_score = score_language_model(reference, windows), score_language_model(candidate, windows)
    assert result.reference.score.perplexity == pytest.approx(ref_score.perplexity, rel=1e-6)
    assert result.candidate.score.perplexity == pytest.approx(cand_score.perplexity, rel=1e-6)
    assert result.perplexity_ratio == pytest.approx(cand_score.perplexity / ref_score.perplexity, rel=1e-6)
    same = (ref_score.predictions == cand_score.predictions).float().mean()
    assert result.top1_agreement == pytest.approx(float(same))
    assert result.candidate.score.tokens == 3 * 47

    stop = [3, 2]  # the tokenizer's end-of-sequence id and the model's
    ref_runs = [generate(reference, tokenizer.encode(p), 10, stop) for p in prompts]
    cand_runs = [generate(candidate, tokenizer.encode(p), 10, stop) for p in prompts]
    assert result.generation == GenerationAgreement.compare(ref_runs, cand_runs)
    assert [s["reference"] for s in result.samples] == [tokenizer.decode(r) for r in ref_runs]
    assert 0 <= result.generation.token_agreement < 1  # different models continue differently
    assert result.reference.speeds == () and result.candidate.speeds == ()


def test_a_model_against_itself_agrees_everywhere():
    reference = tiny_llama(tied=True)
    result = evaluate_causal_lm(reference, reference, CharTokenizer(chat=True), windows=1, window=64,
                                new_tokens=6, measure_speed=False)
    assert result.perplexity_ratio == 1.0 and result.top1_agreement == 1.0
    g = result.generation
    assert (g.prompts, g.identical, g.token_agreement) == (len(DEFAULT_PROMPTS), len(DEFAULT_PROMPTS), 1.0)
    assert result.samples[0]["prompt"] == DEFAULT_PROMPTS[0]
    # tied embeddings: the output layer is the embedding table, held and counted once; in memory the
    # model also holds its rotary tables (buffers that are not saved)
    assert result.reference.size.params == sum(p.numel() for p in reference.parameters())
    unsaved = sum(b.numel() * b.element_size() for m in reference.modules()
                  for n, b in m.named_buffers(recurse=False) if n in m._non_persistent_buffers_set)
    assert result.reference.resident_bytes == result.reference.size.bytes + unsaved


def test_chat_template_formats_the_prompts(pair):
    from modelpress.evaluate.llm import _prompt_ids

    tokenizer = CharTokenizer(chat=True)
    assert tokenizer.decode(_prompt_ids(tokenizer, "hi")) == "<user>hi<assistant>"
    assert tokenizer.decode(_prompt_ids(CharTokenizer(), "hi")) == "hi"


@pytest.mark.parametrize("ref, cand, expected", [
    ([[1, 2, 3]], [[1, 2, 3]], (1, 1, 3, 3)),
    ([[1, 2, 3]], [[1, 9, 3]], (1, 0, 3, 2)),
    ([[1, 2]], [[1, 2, 5, 6]], (1, 0, 4, 2)),  # ran on past the reference's stop: extra positions differ
    ([[1, 2], [4]], [[1], [4]], (2, 1, 3, 2)),
])
def test_generation_agreement_counts(ref, cand, expected):
    g = GenerationAgreement.compare(ref, cand)
    assert (g.prompts, g.identical, g.positions, g.equal) == expected
    assert g.token_agreement == pytest.approx(expected[3] / expected[2])


def test_speed_rows_json_and_the_shared_table(pair):
    reference, candidate = pair
    previous = torch.get_num_threads()
    result = evaluate_causal_lm(reference, candidate, CharTokenizer(), windows=1, window=32, prompts=["Hello"],
                                new_tokens=4, threads=(1,), name="tiny")
    assert torch.get_num_threads() == previous
    (ref_speed,), (cand_speed,) = result.reference.speeds, result.candidate.speeds
    assert (ref_speed.threads, ref_speed.prefill_tokens, ref_speed.decode_tokens) == (1, 32, 3)
    assert cand_speed.prefill_tokens_per_s > 0 and cand_speed.decode_tokens_per_s > 0
    data = json.loads(json.dumps(result.to_dict()))
    assert data["candidate"]["speeds"][0]["decode_tokens"] == 3
    assert data["perplexity_ratio"] == pytest.approx(result.perplexity_ratio)
    metrics = [row[0] for row in result.rows()]
    assert "decode tokens/s, 1 thread" in metrics and "prefill tokens/s, 1 thread" in metrics
    assert any(m.startswith("perplexity (heldout, 1 x 32 tokens)") for m in metrics)
    out = io.StringIO()
    Console(file=out, width=160).print(report_table(result, 2_000_000, 1_000_000))
    text = out.getvalue()
    assert "modelpress report: tiny" in text and "weights file" in text and "50.0%" in text


def test_wrappers_and_mistakes():
    class Wrapper:  # what formats' CausalLM looks like from here: the transformers model as `.model`
        def __init__(self, model):
            self.model = model

    model = tiny_llama()
    result = evaluate_causal_lm(Wrapper(model), model, CharTokenizer(), windows=1, window=32, prompts=["a"],
                                new_tokens=2, measure_speed=False)
    assert result.perplexity_ratio == 1.0
    with pytest.raises(ConfigError, match="not a causal language model"):
        evaluate_causal_lm(object(), model, CharTokenizer())
    with pytest.raises(ConfigError, match="at least one"):
        evaluate_causal_lm(model, model, CharTokenizer(), windows=0)
    with pytest.raises(ConfigError, match="no prompts"):
        evaluate_causal_lm(model, model, CharTokenizer(), windows=1, window=32, prompts=[], measure_speed=False)
