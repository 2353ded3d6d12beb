"""The sparse CPU kernel: y = x W^T + b with W held as a torch.sparse CSR matrix.

`Kernel.SPARSE_CSR` runs a 2-D `SparseTensor` weight through `torch.sparse.mm` (MKL's sparse
BLAS on x86 builds). Whether that beats decode-once dense matmul depends on the shape, the
density and the machine: on the development machine (AMD EPYC, AVX2, 2 threads) it is slower than
dense fp32 for MiniLM's shapes even at 2% density (benchmarks/results_prune.md), so `Kernel.AUTO`
only picks it where it is measured faster. The product is the dense one up to float summation
order (tests bound the difference).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from modelpress.encodings import Encoding
from modelpress.encodings.sparse import SparseLayout, SparseTensor

__all__ = ["supports_sparse_csr", "prepare_sparse_csr", "csr_weight"]


def supports_sparse_csr(enc: Encoding) -> bool:
    """A 2-D sparse weight (any position layout, any value encoding)."""
    return isinstance(enc, SparseTensor) and len(enc.shape) == 2


def csr_weight(enc: SparseTensor) -> torch.Tensor:
    """The (R, C) weight as a torch sparse CSR tensor of float32 kept values."""
    rows, cols = enc.matrix_shape
    if enc.layout is SparseLayout.CSR:
        crow, col = enc.positions["row_ptr"].long(), enc.positions["col"].long()
    else:
        mask = enc.matrix_mask()  # (R, C)
        crow = torch.zeros(rows + 1, dtype=torch.long)
        crow[1:] = mask.sum(1).cumsum(0)
        col = mask.nonzero()[:, 1]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the matmul we use is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, enc.kept_values(torch.float32), (rows, cols))


def prepare_sparse_csr(enc: SparseTensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (..., C) -> x W^T + b through a CSR matrix product."""
    W = csr_weight(enc)

    def run(x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (B, C)
        y = torch.sparse.mm(W, x2.t()).t()  # (B, R)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    return run
