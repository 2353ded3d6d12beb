"""Perplexity and next-token agreement of a causal language model on fixed token windows.

The text is cut into non-overlapping windows of `window` tokens (the first `max_tokens` tokens of
it); every window is scored on its own, so each predicted token sees at most `window - 1` tokens
of context and the figure does not depend on batch size. Perplexity is exp of the mean negative
log-likelihood over every predicted token (window - 1 per window). The argmax prediction at each
position is kept so that two models scored on the same windows can be compared token by token
(`agreement`): the fraction of positions where the compressed model predicts the same next token
as the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ConfigError

__all__ = ["LanguageModelScore", "agreement", "score_language_model", "token_windows"]


@dataclass(frozen=True)
class LanguageModelScore:
    """Mean negative log-likelihood (nats per token), how many tokens it averages, and the argmax predictions."""

    nll: float
    tokens: int
    predictions: torch.Tensor  # (windows, window - 1) int64

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def token_windows(ids: torch.Tensor, window: int = 512, max_tokens: int = 4096) -> torch.Tensor:
    """(n, window) windows from the start of a 1-D token sequence: as many whole windows as fit in `max_tokens`."""
    if ids.dim() != 1:
        raise ConfigError(f"token ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
    if window < 2:
        raise ConfigError(f"a perplexity window needs at least 2 tokens, got {window}")
    n = min(ids.numel(), max_tokens) // window
    if n == 0:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one window of {window}: give more text "
                          "or a smaller window")
    return ids[: n * window].reshape(n, window).to(torch.long)


@torch.inference_mode()
def score_language_model(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> LanguageModelScore:
    """Score `model` (called as `model(input_ids=...)`, returning `.logits` or a logits tensor) on every window."""
    total, count, predictions = 0.0, 0, []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        out = model(input_ids=batch)
        logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += float(nll)
        count += targets.numel()
        predictions.append(logits.argmax(-1))
    return LanguageModelScore(nll=total / count, tokens=count, predictions=torch.cat(predictions))


def agreement(reference: LanguageModelScore, candidate: LanguageModelScore) -> float:
    """Fraction of positions where both models predict the same next token (top-1)."""
    if reference.predictions.shape != candidate.predictions.shape:
        raise ConfigError("the two scores were computed on different windows: score both models on the same windows")
    return float((reference.predictions == candidate.predictions).float().mean())
