"""Matrix views of weight tensors: every encoding sees a weight (R, ...) as the matrix (R, C).

Dim 0 is the output channel (a Linear's row, a conv's filter) and the rest is flattened, so
C = in_features for a Linear and in/groups * kh * kw for a Conv2d. A 1-D tensor is one row and a
scalar is the 1 x 1 matrix.
"""

from __future__ import annotations

import math

import torch

__all__ = ["as_matrix", "matrix_dims"]


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a weight as (rows, columns): dim 0 is the output channel, the rest is flattened."""
    if w.dim() == 0:
        return w.reshape(1, 1)
    if w.dim() == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of the matrix view of `shape`, as `as_matrix` views a tensor of that shape."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])
