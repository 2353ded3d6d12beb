"""The evaluation of a compressed causal language model against its original.

What a user of a small LLM needs to trust a compressed copy, measured on the same tokens for both:

- perplexity on a deterministic built-in text (modelpress.data.text, `heldout` by default: never
  tuned on), tokenised without special tokens (every window is plain text, and another runtime
  can be fed the same ids), cut into `windows` windows of `window` tokens (evaluate/perplexity.py),
  and the top-1 next-token agreement with the original at every scored position;
- greedy generation on a fixed set of prompts (chat-formatted where the tokenizer has a chat
  template): the fraction of generated tokens equal position by position (a continuation that
  stops early or runs on counts its missing or extra positions as different) and the prompts whose
  whole continuation matches;
- speed at each thread count asked: prefill tokens/s (one window of the text as a prompt) and decode
  tokens/s (`new_tokens` greedy tokens after the first prompt), the faster of two runs after a
  warm-up, through modelpress.nn.generation (the same engine for both models);
- memory: the bytes of the tensors each model keeps while it runs (evaluate/memory.py: decoded
  copies and packed kernel weights included, tied tensors once), the stored bytes, the peak rise of
  the process's resident set while it generates, and the process's resident set at the start.

Speeds are only comparable on a quiet machine, and both models are timed in the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.data.text import reference_text
from modelpress.errors import ConfigError
from modelpress.evaluate.memory import peak_rss, resident_bytes, rss_bytes
from modelpress.evaluate.perplexity import LanguageModelScore, agreement, score_language_model, token_windows
from modelpress.evaluate.report import Row, size_rows
from modelpress.evaluate.size import SizeReport, size_report
from modelpress.nn.generation import Engine, greedy_generate

__all__ = ["DEFAULT_PROMPTS", "GenerationAgreement", "LLMEvaluation", "ModelRun", "Speed", "evaluate_causal_lm"]

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Name three uses of copper.",
    "How do plants make food from sunlight?",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Give one tip for writing clear code.",
)
SPEED_RUNS = 2  # timed runs per figure; the faster is kept (a busy moment only ever slows a run down)


@dataclass(frozen=True)
class Speed:
    """Prefill and decode throughput of one model at one thread count."""

    threads: int
    prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_tokens_per_s: float

    def to_dict(self) -> dict[str, float]:
        return {"threads": self.threads, "prefill_tokens": self.prefill_tokens,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens": self.decode_tokens,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass(frozen=True)
class ModelRun:
    """One model's figures."""

    score: LanguageModelScore
    size: SizeReport
    resident_bytes: int  # tensors kept while running (evaluate/memory.py)
    generation_peak_bytes: int | None  # rise of the process's resident set while generating
    speeds: tuple[Speed, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.score.perplexity, "nll": self.score.nll, "tokens": self.score.tokens,
                "tensor_bytes": self.size.bytes, "bits_per_weight": self.size.bits_per_weight,
                "resident_bytes": self.resident_bytes, "generation_peak_bytes": self.generation_peak_bytes,
                "speeds": [s.to_dict() for s in self.speeds]}


@dataclass(frozen=True)
class GenerationAgreement:
    """Greedy continuations of the same prompts by both models, compared token by token."""

    prompts: int
    identical: int  # prompts whose whole continuation matches
    positions: int  # sum over prompts of the longer continuation's length
    equal: int  # positions where both continuations hold the same token

    @property
    def token_agreement(self) -> float:
        return self.equal / self.positions if self.positions else 1.0

    @classmethod
    def compare(cls, reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> "GenerationAgreement":
        if len(reference) != len(candidate):
            raise ConfigError("compare continuations of the same prompts: the two lists differ in length")
        positions = sum(max(len(a), len(b)) for a, b in zip(reference, candidate))
        equal = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(reference, candidate))
        identical = sum(tuple(a) == tuple(b) for a, b in zip(reference, candidate))
        return cls(len(reference), identical, positions, equal)

    def to_dict(self) -> dict[str, float]:
        return {"prompts": self.prompts, "identical_prompts": self.identical, "positions": self.positions,
                "equal_tokens": self.equal, "token_agreement": self.token_agreement}


@dataclass(frozen=True)
class LLMEvaluation:
    name: str
    text_split: str
    window: int
    reference: ModelRun
    candidate: ModelRun
    top1_agreement: float
    generation: GenerationAgreement
    new_tokens: int
    engine: str
    process_rss_bytes: int | None = None
    samples: tuple[Mapping[str, str], ...] = ()  # {"prompt", "reference", "candidate"} texts

    @property
    def perplexity_ratio(self) -> float:
        return self.candidate.score.perplexity / self.reference.score.perplexity

    def rows(self, original_file_bytes: int | None = None, file_bytes: int | None = None) -> list[Row]:
        """The report's rows (the encoder report's shape: metric, original, compressed, ratio)."""
        ref, cand = self.reference, self.candidate
        rows = size_rows(ref.size, cand.size, original_file_bytes, file_bytes)
        rows.append(("weights in memory", _mb(ref.resident_bytes), _mb(cand.resident_bytes),
                     f"{cand.resident_bytes / max(ref.resident_bytes, 1):.1%}"))
        windows = ref.score.predictions.shape[0]
        rows.append((f"perplexity ({self.text_split}, {windows} x {self.window} tokens)",
                     f"{ref.score.perplexity:.3f}", f"{cand.score.perplexity:.3f}", f"{self.perplexity_ratio:.3f}x"))
        rows.append((f"top-1 next-token agreement ({ref.score.tokens} tokens)", "1", f"{self.top1_agreement:.4f}", ""))
        g = self.generation
        rows.append((f"greedy tokens equal ({g.prompts} prompts, up to {self.new_tokens} tokens)", "1",
                     f"{g.token_agreement:.4f}", ""))
        rows.append(("prompts with the same continuation", f"{g.prompts}/{g.prompts}", f"{g.identical}/{g.prompts}",
                     ""))
        for a, b in zip(ref.speeds, cand.speeds):
            rows.append((f"prefill tokens/s, {a.threads} thread{'s' * (a.threads > 1)}",
                         f"{a.prefill_tokens_per_s:.1f}", f"{b.prefill_tokens_per_s:.1f}",
                         f"{b.prefill_tokens_per_s / a.prefill_tokens_per_s:.2f}x"))
            rows.append((f"decode tokens/s, {a.threads} thread{'s' * (a.threads > 1)}",
                         f"{a.decode_tokens_per_s:.1f}", f"{b.decode_tokens_per_s:.1f}",
                         f"{b.decode_tokens_per_s / a.decode_tokens_per_s:.2f}x"))
        if ref.generation_peak_bytes is not None and cand.generation_peak_bytes is not None:
            rows.append(("peak memory rise while generating", _mb(ref.generation_peak_bytes),
                         _mb(cand.generation_peak_bytes), ""))
        if self.process_rss_bytes is not None:
            rows.append(("process resident set (both models loaded)", "", _mb(self.process_rss_bytes), ""))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "text_split": self.text_split, "window": self.window,
                "windows": int(self.reference.score.predictions.shape[0]), "new_tokens": self.new_tokens,
                "engine": self.engine, "perplexity_ratio": self.perplexity_ratio,
                "top1_agreement": self.top1_agreement, "generation": self.generation.to_dict(),
                "reference": self.reference.to_dict(), "candidate": self.candidate.to_dict(),
                "process_rss_bytes": self.process_rss_bytes, "samples": [dict(s) for s in self.samples]}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def evaluate_causal_lm(reference, candidate, tokenizer, *, text_split: str = "heldout", windows: int = 8,
                       window: int = 512, prompts: Sequence[str] | None = None, new_tokens: int = 32,
                       threads: Sequence[int] = (1, 2), measure_speed: bool = True, name: str = "compressed",
                       engine: Engine | str = Engine.AUTO,
                       advance: Callable[[str], None] | None = None) -> LLMEvaluation:
    """Compare `candidate` against `reference` (causal LMs sharing `tokenizer`); see the module's docstring.

    A model is a transformers causal LM, or an object holding one as `.model`. `advance(stage)` is
    called as each stage ends (for a progress display).
    """
    ref_model, cand_model = _runnable(reference), _runnable(candidate)
    if windows < 1 or new_tokens < 1 or (measure_speed and (not threads or min(threads) < 1)):
        raise ConfigError(f"windows={windows}, new_tokens={new_tokens}, threads={tuple(threads)}: give at least one "
                          "window, one new token and thread counts of at least 1")
    note = advance or (lambda stage: None)
    rss = rss_bytes()
    ids = torch.tensor(_encode(tokenizer, reference_text(text_split), special=False), dtype=torch.long)
    batches = token_windows(ids, window=window, max_tokens=windows * window)
    ref_score = score_language_model(ref_model, batches)
    cand_score = score_language_model(cand_model, batches)
    note("perplexity")
    prompt_ids = [_prompt_ids(tokenizer, p) for p in (DEFAULT_PROMPTS if prompts is None else prompts)]
    if not prompt_ids:
        raise ConfigError("no prompts to generate from: give at least one prompt, or None for the built-in set")
    stop = _stop_tokens(tokenizer, ref_model)
    ref_tokens, ref_peak = _continuations(ref_model, prompt_ids, new_tokens, stop, engine)
    cand_tokens, cand_peak = _continuations(cand_model, prompt_ids, new_tokens, stop, engine)
    note("generation")
    ref_speeds, cand_speeds = (), ()
    if measure_speed:
        ref_speeds, cand_speeds = _speeds(ref_model, cand_model, batches[0], prompt_ids[0], new_tokens, threads, engine)
        note("speed")
    prompt_texts = DEFAULT_PROMPTS if prompts is None else prompts
    samples = tuple({"prompt": p, "reference": _decode(tokenizer, a), "candidate": _decode(tokenizer, b)}
                    for p, a, b in zip(prompt_texts, ref_tokens, cand_tokens))
    return LLMEvaluation(
        name=name, text_split=text_split, window=window,
        reference=ModelRun(ref_score, size_report(ref_model), resident_bytes(ref_model), ref_peak, ref_speeds),
        candidate=ModelRun(cand_score, size_report(cand_model), resident_bytes(cand_model), cand_peak, cand_speeds),
        top1_agreement=agreement(ref_score, cand_score),
        generation=GenerationAgreement.compare(ref_tokens, cand_tokens),
        new_tokens=new_tokens, engine=Engine(engine).value, process_rss_bytes=rss, samples=samples,
    )


def _runnable(model) -> nn.Module:
    """The transformers causal LM to run: the model itself, or the one a wrapper holds as `.model`."""
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "config"):
        return inner
    raise ConfigError(f"{type(model).__name__} is not a causal language model: give a transformers causal LM "
                      "or a modelpress CausalLM")


def _continuations(model: nn.Module, prompts: list[list[int]], new_tokens: int, stop: frozenset[int],
                   engine: Engine | str) -> tuple[list[tuple[int, ...]], int | None]:
    """Greedy continuations of every prompt, and the rise of the resident set while they ran."""
    with peak_rss() as peak:
        tokens = [greedy_generate(model, p, new_tokens, stop=stop, engine=engine).tokens for p in prompts]
    return tokens, peak.increase_bytes


def _speeds(ref: nn.Module, cand: nn.Module, prefill_ids: torch.Tensor, prompt: list[int], new_tokens: int,
            threads: Sequence[int], engine: Engine | str) -> tuple[tuple[Speed, ...], tuple[Speed, ...]]:
    """Prefill and decode speed of both models at each thread count (the caller's count restored after)."""
    previous = torch.get_num_threads()
    results: tuple[list[Speed], list[Speed]] = ([], [])
    try:
        for n in threads:
            torch.set_num_threads(n)
            for model, out in ((ref, results[0]), (cand, results[1])):
                greedy_generate(model, prompt, 2, engine=engine)  # warm-up: kernels prepared at this thread count
                prefill = min((greedy_generate(model, prefill_ids, 1, engine=engine) for _ in range(SPEED_RUNS)),
                              key=lambda g: g.prefill_s)
                decode = min((greedy_generate(model, prompt, new_tokens, engine=engine) for _ in range(SPEED_RUNS)),
                             key=lambda g: g.decode_s)
                out.append(Speed(n, prefill.prompt_tokens, prefill.prefill_tokens_per_s, decode.decoded,
                                 decode.decode_tokens_per_s or 0.0))
    finally:
        torch.set_num_threads(previous)
    return tuple(results[0]), tuple(results[1])


# -- tokenizers: transformers' (encode/decode, chat templates) or a plain `tokenizers.Tokenizer` --------------


def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=special)
    ids = getattr(ids, "ids", ids)  # tokenizers.Tokenizer gives an Encoding
    if not ids:
        raise ConfigError("the tokenizer gave no tokens for the text: check that it is the model's tokenizer")
    return list(ids)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as the model expects it: through the chat template where the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return _encode(tokenizer, text, special=False)
    return _encode(tokenizer, prompt)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)) if hasattr(tokenizer, "decode") else ""


def _stop_tokens(tokenizer, model: nn.Module) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    found: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return frozenset(found)
