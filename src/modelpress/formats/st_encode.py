"""`SentenceEncoder.encode` with sentence-transformers' arguments, meaning what they mean there.

    batch_size             sentences per forward (batches formed by length; results in input order)
    show_progress_bar      a progress bar over batches on stderr (tqdm, which transformers installs)
    convert_to_numpy       a numpy float32 array (N, C)
    convert_to_tensor      one torch tensor (N, C); takes precedence over convert_to_numpy, as there
    normalize_embeddings   L2-normalise every embedding
    a single string        gives one embedding (C,) instead of (1, C)

One difference, kept for the code that already calls it: with neither `convert_to_numpy` nor
`convert_to_tensor` given, the result is a torch tensor (sentence-transformers gives numpy). Passing
`convert_to_numpy=False, convert_to_tensor=False` gives a list of 1-D tensors, as there.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from modelpress.data.batches import tokenised_batches
from modelpress.errors import ConfigError

__all__ = ["encode_sentences"]


def _flag(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: give True or False")
    return value


def _progress(total: int, show: bool | None):
    """A tqdm bar over `total` batches when asked for (None: never, as for a library call)."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Batches", unit="batch")


def encode_sentences(model: Any, forward: Callable[..., torch.Tensor], sentences: str | Sequence[str],
                     batch_size: int = 32, show_progress_bar: bool | None = None,
                     convert_to_numpy: bool | None = None, convert_to_tensor: bool | None = None,
                     normalize_embeddings: bool = False):
    """Embeddings of `sentences` by `forward(**model.tokenize(batch))` (see the module docstring)."""
    for name, value in (("show_progress_bar", show_progress_bar), ("convert_to_numpy", convert_to_numpy),
                        ("convert_to_tensor", convert_to_tensor), ("normalize_embeddings", normalize_embeddings)):
        _flag(name, value)
    single = isinstance(sentences, str)
    texts = [sentences] if single else list(sentences)
    if not all(isinstance(s, str) for s in texts):
        raise ConfigError("encode takes a string or a list of strings")
    batches = tokenised_batches(model, texts, batch_size, longest_first=True)
    out: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
    bar = _progress(len(batches), show_progress_bar)
    try:
        for idx, inputs in batches:
            emb = forward(**inputs).float()  # (B, C)
            if normalize_embeddings:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            for row, i in enumerate(idx):
                out[i] = emb[row]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if convert_to_tensor or (convert_to_tensor is None and convert_to_numpy is None):
        result: Any = torch.stack(out) if out else torch.empty(0, 0)
    elif convert_to_numpy or convert_to_numpy is None:
        result = torch.stack(out).numpy() if out else torch.empty(0, 0).numpy()
    else:
        return out[0] if single else out
    return result[0] if single else result
