"""Sentences in tokenised batches of similar length (less padding), in a deterministic order.

The one way calibration, sensitivity and `SentenceEncoder.encode` batch sentences: sorted by
character length (ties by position), shortest or longest first, cut into batches, each tokenised
by the model's own `tokenize`.
"""

from __future__ import annotations

from typing import Any, Sequence

from modelpress.errors import ConfigError

__all__ = ["length_sorted", "tokenised_batches"]


def length_sorted(sentences: Sequence[str], batch_size: int, longest_first: bool = False) -> list[list[int]]:
    """Indices of `sentences` in batches of up to `batch_size`, sorted by length (ties: input order)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: give a positive integer")
    sign = -1 if longest_first else 1
    order = sorted(range(len(sentences)), key=lambda i: (sign * len(sentences[i]), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def tokenised_batches(model: Any, sentences: Sequence[str], batch_size: int,
                      longest_first: bool = False) -> list[tuple[list[int], dict[str, Any]]]:
    """(sentence indices, `model.tokenize` of those sentences) per batch, batches formed by length."""
    tokenize = getattr(model, "tokenize", None)
    if not callable(tokenize):
        raise ConfigError(
            f"sentences need a model with a tokenizer (tokenize(), e.g. a SentenceEncoder from "
            f"load_sentence_encoder), not a {type(model).__name__}: give tokenised input batches instead"
        )
    return [(idx, tokenize([sentences[i] for i in idx])) for idx in length_sorted(sentences, batch_size, longest_first)]
