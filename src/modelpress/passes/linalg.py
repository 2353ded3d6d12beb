"""Linear algebra the data-aware passes share (pure: tensors in, tensors out).

GPTQ, SparseGPT and activation-aware low rank all factor a calibration Hessian H = sum x x^T
(C, C). H is often singular (inputs that never vary, fewer tokens than channels), so each adds
damp * mean(diag H) to its diagonal, and raises damp tenfold while the factorisation fails.
`one_thread` is the scope their many small sequential ops run in.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from modelpress.errors import CalibrationError

__all__ = ["MAX_DAMP_RETRIES", "damped_cholesky", "inverse_cholesky", "one_thread", "output_error"]

MAX_DAMP_RETRIES = 4  # each retry multiplies the damping by 10 when H + damp I is not positive definite


def _damped(H: torch.Tensor, damp: float, factor: Callable[[torch.Tensor], torch.Tensor | None]):
    """(factor(H + damp * mean(diag H) * I), damp), damping H in place and raising damp until `factor` succeeds."""
    mean_diag = float(H.diagonal().mean().clamp_min(1e-12))
    added = 0.0
    for _ in range(MAX_DAMP_RETRIES + 1):
        H.diagonal().add_(damp * mean_diag - added)
        added = damp * mean_diag
        result = factor(H)
        if result is not None:
            return result, damp
        tried, damp = damp, max(damp * 10, 1e-4)
    raise CalibrationError(f"the calibration Hessian stays singular even with damping {tried:g}: "
                           "give more (and more varied) calibration data")


def _lower(H: torch.Tensor) -> torch.Tensor | None:
    L, info = torch.linalg.cholesky_ex(H)
    return L if info == 0 else None


def _inverse_upper(H: torch.Tensor) -> torch.Tensor | None:
    L = _lower(H)
    if L is None:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U if info == 0 else None


def damped_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Lower L with L L^T = H + damp * mean(diag H) * I (in H's dtype; H is damped in place), and the damp used."""
    return _damped(H, damp, _lower)


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, and the damp used.

    H is a working copy and is damped in place: at most three (C, C) matrices live at once.
    """
    return _damped(H, damp, _inverse_upper)


def output_error(W: torch.Tensor, W_q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error tr(D H D^T) / tr(W H W^T) with D = W - W_q: ||X D^T||^2 / ||X W^T||^2."""
    D = (W - W_q).to(H.dtype)
    W = W.to(H.dtype)
    return float(((D @ H) * D).sum(dtype=torch.float64) / ((W @ H) * W).sum(dtype=torch.float64).clamp_min(1e-30))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a pass's maths on one intra-op thread, restoring the caller's setting afterwards.

    GPTQ's column loop, group-parameter searches and the decompositions of low rank are many
    thousands of small sequential tensor ops. Each op large enough to enter a parallel region
    waits for every worker thread, and on a shared, busy CPU a descheduled worker costs a
    scheduler time slice: measured on the 2-core development machine under load, 16 ms per op on
    two threads against 2-30 us on one, which made GPTQ of MiniLM take minutes instead of seconds.
    Calibration forwards (few, large ops) keep the caller's thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
