"""Calibration inputs: sentences, dicts of tensors or tensors, normalised into forward-call batches.

Sentences are tokenised with `model.tokenize` in batches of similar length; dicts of tensors are
keyword inputs, tensors (or tuples of tensors) positional ones. The `attention_mask` of a batch,
when it has one, marks the real tokens: padded positions never enter a statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.data.batches import tokenised_batches
from modelpress.data.corpus import corpus_splits, stdlib_sentences
from modelpress.data.text import reference_text
from modelpress.errors import CalibrationError

__all__ = ["DEFAULT_BATCH_SIZE", "CalibrationBatch", "calibration_sentences", "calibration_windows",
           "prepare_batches", "text_windows"]

DEFAULT_BATCH_SIZE = 32  # sentences per tokenised batch


def calibration_sentences(n: int = 128, seed: int = 0) -> list[str]:
    """`n` English sentences for calibration, disjoint from any evaluation set of the corpus.

    Evaluation takes the first sentences of the shuffled corpus (`corpus_splits(...).evaluation`);
    calibration takes the last `n`, so the two never overlap however many sentences an
    evaluation uses (short of the whole corpus).
    """
    total = len(stdlib_sentences(seed))
    if not 1 <= n < total:
        raise CalibrationError(f"calibration_sentences(n={n}): ask for between 1 and {total - 1} sentences")
    return list(corpus_splits(n_eval=total - n, n_calib=n, seed=seed).calibration)


def text_windows(tokenizer: Any, text: str, windows: int, window: int = 512) -> list[dict[str, torch.Tensor]]:
    """Running text through a causal LM's tokenizer, cut into `windows` (1, window) input batches.

    `tokenizer(text)["input_ids"]` gives the ids (a Hugging Face tokenizer); windows are consecutive
    and do not overlap, from the start of the text, as the perplexity windows are cut.
    """
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise CalibrationError(f"windows={windows!r}: ask for a positive number of calibration windows")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise CalibrationError(f"window={window!r}: a calibration window needs at least 2 tokens")
    ids = torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long).reshape(-1)
    if ids.numel() < windows * window:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than {windows} windows of {window}: "
                               f"ask for at most {ids.numel() // window} windows or a smaller window")
    return [{"input_ids": w[None]} for w in ids[: windows * window].reshape(windows, window)]


def calibration_windows(tokenizer: Any, windows: int = 32, window: int = 512) -> list[dict[str, torch.Tensor]]:
    """Calibration for a causal LM: `windows` windows of the `dev` reference text (never the `heldout`
    text that perplexity is reported on), through the model's own tokenizer."""
    return text_windows(tokenizer, reference_text("dev"), windows, window)


@dataclass(frozen=True)
class CalibrationBatch:
    """One forward call's inputs, and which of its token positions are real (not padding)."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None  # (B, T) bool

    def run(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def prepare_batches(model: nn.Module, calibration: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> list[CalibrationBatch]:
    """Calibration data as forward-call batches: a list of sentences, of dicts of tensors, or of tensors."""
    if isinstance(calibration, (str, bytes)):
        raise CalibrationError("calibration is one string: give a list of sentences, e.g. calibration_sentences(128)")
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    try:
        items = list(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration of type {type(calibration).__name__} is not supported: give a list of sentences, "
            "of input dicts (e.g. model.tokenize(...)) or of input tensors"
        ) from None
    if not items:
        raise CalibrationError("the calibration set is empty: give at least one sentence or input batch, "
                               "e.g. calibration_sentences(128)")
    kinds = {_kind(item, i) for i, item in enumerate(items)}
    if len(kinds) > 1:
        raise CalibrationError(f"calibration mixes {sorted(kinds)}: give only sentences, only dicts or only tensors")
    kind = kinds.pop()
    if kind == "sentences":  # tokenised in batches of similar length (less padding)
        batches = [CalibrationBatch(kwargs=inputs, token_mask=_mask_of(inputs, i))
                   for i, (_, inputs) in enumerate(tokenised_batches(model, items, batch_size))]
    elif kind == "dicts":
        batches = [CalibrationBatch(kwargs=dict(item), token_mask=_mask_of(item, i)) for i, item in enumerate(items)]
    else:
        batches = [CalibrationBatch(args=tuple(item) if isinstance(item, (tuple, list)) else (item,))
                   for item in items]
    for i, batch in enumerate(batches):
        _check_tensors(batch, i)
    return batches


def _kind(item: Any, index: int) -> str:
    if isinstance(item, str):
        return "sentences"
    if isinstance(item, dict):
        for key, value in item.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, torch.Tensor)):
                raise CalibrationError(
                    f"calibration batch {index}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                    "give dicts of tensors such as model.tokenize(sentences)"
                )
        return "dicts"
    if isinstance(item, torch.Tensor):
        return "tensors"
    if isinstance(item, (tuple, list)) and item and all(isinstance(t, torch.Tensor) for t in item):
        return "tensors"
    raise CalibrationError(
        f"calibration item {index} is a {type(item).__name__}: give sentences (str), input dicts of tensors, "
        "or input tensors"
    )


def _mask_of(inputs: dict[str, Any], index: int) -> torch.Tensor | None:
    """The (B, T) bool mask of real tokens from an input dict's `attention_mask`, checked against `input_ids`."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    ids = inputs.get("input_ids")
    if mask.dim() != 2 or (ids is not None and tuple(ids.shape) != tuple(mask.shape)):
        ids_shape = None if ids is None else tuple(ids.shape)
        raise CalibrationError(
            f"calibration batch {index}: attention_mask has shape {tuple(mask.shape)} but input_ids {ids_shape}: "
            "give a (batch, tokens) mask with the same shape as input_ids"
        )
    return mask.bool()


def _check_tensors(batch: CalibrationBatch, index: int) -> None:
    tensors = list(batch.args) + [v for v in batch.kwargs.values() if v is not None]
    for t in tensors:
        if t.numel() == 0:
            raise CalibrationError(f"calibration batch {index} holds an empty tensor of shape {tuple(t.shape)}: "
                                   "give at least one token per batch")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError(f"calibration batch {index} holds NaN or infinite values: "
                                   "clean the calibration inputs")
