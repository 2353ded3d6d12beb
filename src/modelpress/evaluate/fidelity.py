"""How closely a compressed model's sentence embeddings follow the original model's.

Two views: the cosine between the two embeddings of each sentence (does each vector keep its
direction?) and the overlap of nearest-neighbour lists (does retrieval return the same sentences?).
The second is what a search application sees, and can drop while the mean cosine still looks high.
All maths runs in float64, so that identical inputs score exactly 1 up to rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from modelpress.errors import ConfigError

__all__ = ["Fidelity", "cosine_similarities", "fidelity", "neighbour_overlap"]

_EPS = 1e-12  # norm floor: a zero embedding has cosine 0 with everything instead of NaN


def cosine_similarities(reference: Tensor, candidate: Tensor) -> Tensor:
    """Cosine between each reference row and the same candidate row; inputs need not be normalised."""
    _check_pair(reference, candidate)
    return (_unit_rows(reference) * _unit_rows(candidate)).sum(dim=1)  # (N,)


def neighbour_overlap(reference: Tensor, candidate: Tensor, n_queries: int = 200, k: int = 10) -> float:
    """Mean fraction of each query's k nearest neighbours that both embeddings agree on.

    The first `n_queries` rows are the queries; their neighbours are searched, by cosine, among all
    rows of the same matrix except the query itself.
    """
    _check_pair(reference, candidate)
    n = reference.shape[0]
    if not 1 <= k < n:
        raise ConfigError(f"k={k} neighbours out of {n} sentences: give 1 <= k < {n} (the query is excluded)")
    if not 1 <= n_queries <= n:
        raise ConfigError(f"n_queries={n_queries} out of {n} sentences: give 1 <= n_queries <= {n}")
    A = _top_k_neighbours(reference, n_queries, k)  # (Q, k)
    B = _top_k_neighbours(candidate, n_queries, k)  # (Q, k)
    shared = (A[:, :, None] == B[:, None, :]).any(dim=2).sum(dim=1)  # (Q,) indices are unique per row
    return (shared.double() / k).mean().item()


@dataclass(frozen=True)
class Fidelity:
    """Summary of `cosine_similarities` and `neighbour_overlap` for one compressed model."""

    mean_cosine: float
    p1_cosine: float
    min_cosine: float
    overlap_at_10: float
    n_sentences: int
    n_queries: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def fidelity(reference: Tensor, candidate: Tensor, n_queries: int = 200, k: int = 10) -> Fidelity:
    """Cosine statistics over all sentences and neighbour overlap over the first `n_queries`.

    The 1st-percentile and minimum cosines show the worst sentences, which a mean hides.
    """
    cos = cosine_similarities(reference, candidate)  # (N,)
    return Fidelity(
        mean_cosine=cos.mean().item(),
        p1_cosine=torch.quantile(cos, 0.01).item(),
        min_cosine=cos.min().item(),
        overlap_at_10=neighbour_overlap(reference, candidate, n_queries=n_queries, k=k),
        n_sentences=reference.shape[0],
        n_queries=n_queries,
    )


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit length, in float64."""
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)


def _top_k_neighbours(x: Tensor, n_queries: int, k: int) -> Tensor:
    """Indices of the k rows most cosine-similar to each of the first `n_queries` rows, self excluded."""
    u = _unit_rows(x)  # (N, D)
    scores = u[:n_queries] @ u.T  # (Q, N)
    queries = torch.arange(n_queries)
    scores[queries, queries] = float("-inf")
    return scores.topk(k, dim=1).indices  # (Q, k)


def _check_pair(reference: Tensor, candidate: Tensor) -> None:
    """Refuse inputs whose comparison would be meaningless: shapes that differ, or NaN/inf."""
    if reference.ndim != 2 or reference.shape[0] < 1:
        raise ConfigError(
            f"reference embeddings have shape {tuple(reference.shape)}: give a (sentences, dim) matrix"
        )
    if candidate.shape != reference.shape:
        raise ConfigError(
            f"candidate embeddings have shape {tuple(candidate.shape)} but reference has "
            f"{tuple(reference.shape)}: encode the same sentences with both models"
        )
    for name, x in (("reference", reference), ("candidate", candidate)):
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise ConfigError(
                f"{name} embeddings hold {bad} NaN/inf values: the model overflowed or its weights "
                "are corrupt; check the compressed weights and the dtype the model runs in"
            )
