"""Weight sharing (Deep Compression's trained quantisation, Han et al. 2016): a codebook plus indices.

A tensor is represented by k <= 2^b float16 centroids (one codebook per tensor) and, for every
entry, the b-bit index of its centroid: w_hat[i] = codebook[index[i]]. The centroids come from
1-D k-means on the tensor's values (`kmeans_1d`), so unlike a uniform grid they follow the weight
distribution, and they can be fine-tuned afterwards (`passes.cluster.finetune_centroids`).

Arrays (the tensor viewed as the matrix (R, C) of `encodings.views.as_matrix`; a 1-D tensor
of n entries is one row of n):

- ``codebook``: (k,) float16, 1 <= k <= 2^b, finite; any order (fine-tuning may reorder).
- ``indices``: uint8 (R, packed_row_bytes(C, b)), the indices of each row packed by the rule of
  `encodings.packing` (any width 1..8, `widths=INDEX_BITS`); every index is < k and the padding
  codes of a row are zero.

Metadata: ``{"kind": "clustered", "shape": [...], "bits": b}``. As the values of a `SparseTensor`
(shape (R, K) or (nnz,)), only a pruned layer's kept weights are clustered; its zeros stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from modelpress.encodings.base import Encoding, check_shape, register_encoding, require_array
from modelpress.encodings.packing import INDEX_BITS, pack_codes, packed_row_bytes, unpack_codes
from modelpress.encodings.views import matrix_dims
from modelpress.errors import ConfigError, FormatError

__all__ = ["ClusteredTensor", "KMeansInit", "assign", "cluster", "kmeans_1d"]

CODEBOOK_DTYPE = torch.float16


class KMeansInit(str, Enum):
    LINEAR = "linear"  # evenly spaced in [min, max] (Deep Compression's best: keeps the rare large weights)
    DENSITY = "density"  # equal-mass quantiles (k bins of equal count, their centres)
    RANDOM = "random"  # Forgy: k distinct values drawn from the data (seeded)


# ---------------------------------------------------------------- 1-D k-means (pure)


def _initial_centroids(xs: torch.Tensor, k: int, init: KMeansInit, seed: int) -> torch.Tensor:
    """Sorted, distinct (<= k,) float64 starting centroids for sorted values `xs` (n,)."""
    n = xs.numel()
    if init is KMeansInit.LINEAR:
        c = torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)
    elif init is KMeansInit.DENSITY:
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k  # centre of each equal-mass bin of the CDF
        c = xs[(q * (n - 1)).round().long()]
    else:
        g = torch.Generator().manual_seed(seed)
        c = xs[torch.randperm(n, generator=g)[:k]]
    return torch.unique(c)  # sorted; equal starts would share their members forever


def kmeans_1d(x: torch.Tensor, k: int, init: KMeansInit | str = KMeansInit.LINEAR, iterations: int = 30,
              seed: int = 0) -> torch.Tensor:
    """Sorted float64 centroids (<= k of them) minimising sum_i min_j (x_i - c_j)^2, by Lloyd's iterations.

    In one dimension the clusters of sorted centroids are contiguous runs of the sorted values, cut
    at the midpoints between neighbours (a value on a midpoint joins the lower cluster). So after
    one O(n log n) sort and prefix sum, an iteration finds the k-1 cuts by binary search and each
    run's mean from the prefix sums: O(k log n). A prefix difference can lose a small run's digits
    to cancellation (absolute error ~ eps * sum|x|), so each mean is clamped into its run's
    [min, max], which keeps centroids strictly increasing. An empty cluster keeps its centroid.
    """
    init = KMeansInit(init)
    xs = x.detach().reshape(-1).to(torch.float64).sort().values  # (n,)
    if xs.numel() == 0:
        return torch.zeros(1, dtype=torch.float64)
    n = xs.numel()
    prefix = torch.cat([xs.new_zeros(1), xs.cumsum(0)])  # (n+1,)
    c = _initial_centroids(xs, k, init, seed)  # (k',)
    for _ in range(iterations):
        cuts = torch.searchsorted(xs, (c[1:] + c[:-1]) / 2, right=True)  # (k'-1,) values <= each midpoint
        bounds = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), n)])  # (k'+1,) run j is [b_j, b_j+1)
        counts = bounds.diff()
        means = (prefix[bounds[1:]] - prefix[bounds[:-1]]) / counts.clamp_min(1)
        lo, hi = xs[bounds[:-1].clamp_max(n - 1)], xs[(bounds[1:] - 1).clamp_min(0)]  # each run's min, max
        new = torch.where(counts > 0, torch.minimum(torch.maximum(means, lo), hi), c)
        if torch.equal(new, c):
            break
        c = new
    return c


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `centroids` for each entry of `x` (ties go to the lower one), long."""
    mid = (centroids[1:] + centroids[:-1]) / 2  # (k-1,)
    return torch.searchsorted(mid, x.to(mid.dtype).contiguous(), right=False)


def cluster(w: torch.Tensor, bits: int, init: KMeansInit | str = KMeansInit.LINEAR, iterations: int = 30,
            seed: int = 0) -> "ClusteredTensor":
    """Share the weights of `w` among <= 2^bits float16 centroids found by 1-D k-means.

    Entries are assigned to the nearest *stored* (float16-rounded) centroid, so what is saved is
    exactly what was optimised; centroids no entry uses are dropped.
    """
    _check_bits(bits)
    w = w.detach()
    if not torch.isfinite(w).all():
        raise ConfigError("cannot cluster a tensor holding NaN or infinity: check the model's weights")
    centroids = kmeans_1d(w, 1 << bits, init, iterations, seed).to(CODEBOOK_DTYPE)
    if not torch.isfinite(centroids).all():
        raise ConfigError("weights exceed the float16 range of the codebook: rescale the layer or exclude it")
    codebook = torch.unique(centroids).to(torch.float64)  # sorted; rounding may merge neighbours
    labels = assign(w.reshape(-1), codebook)  # (n,)
    used = torch.bincount(labels, minlength=codebook.numel()) > 0
    if w.numel():
        codebook, labels = codebook[used], (used.cumsum(0) - 1)[labels]
    return ClusteredTensor.from_labels(codebook.to(CODEBOOK_DTYPE), labels.reshape(w.shape), bits)


# ---------------------------------------------------------------- the encoding


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in INDEX_BITS:
        raise ConfigError(f"cluster index width {bits!r} is not valid: use an integer in 1..8 (2^bits centroids)")


def _corrupt(what: str) -> FormatError:
    return FormatError(f"clustered encoding {what}; the file is corrupt, re-save the model")


@register_encoding
@dataclass(frozen=True, eq=False)
class ClusteredTensor(Encoding):
    """A float16 codebook of k <= 2^bits centroids and each entry's packed centroid index."""

    kind = "clustered"
    codebook: torch.Tensor  # (k,) float16
    indices: torch.Tensor  # (R, packed_row_bytes(C, bits)) uint8, see encodings.packing
    bits: int
    tensor_shape: tuple[int, ...]

    @classmethod
    def from_labels(cls, codebook: torch.Tensor, labels: torch.Tensor, bits: int) -> "ClusteredTensor":
        """The encoding of a tensor whose entry i is codebook[labels[i]] (`labels` has the tensor's shape)."""
        _check_bits(bits)
        if codebook.dim() != 1 or not 1 <= codebook.numel() <= 1 << bits:
            raise ConfigError(f"a codebook needs 1..{1 << bits} centroids for {bits}-bit indices, got "
                              f"{tuple(codebook.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= codebook.numel()):
            raise ConfigError(f"cluster labels must lie in [0, {codebook.numel()})")
        indices = pack_codes(labels.reshape(matrix_dims(tuple(labels.shape))), bits, widths=INDEX_BITS)
        return cls(codebook.to(CODEBOOK_DTYPE).contiguous(), indices, bits, tuple(labels.shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor_shape

    def labels(self) -> torch.Tensor:
        """Each entry's centroid index, long, in the tensor's shape."""
        cols = self.matrix_shape[1]
        return unpack_codes(self.indices, self.bits, cols, widths=INDEX_BITS).long().reshape(self.tensor_shape)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.codebook.to(dtype)[self.labels()]

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode only rows `index` ((K,) long) of the matrix view as (K, C)."""
        cols = self.matrix_shape[1]
        labels = unpack_codes(self.indices[index], self.bits, cols, widths=INDEX_BITS).long()  # (K, C)
        return self.codebook.to(dtype)[labels]

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"codebook": self.codebook, "indices": self.indices}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.tensor_shape), "bits": self.bits}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "ClusteredTensor":
        shape = check_shape(meta, cls.kind)
        bits = meta.get("bits")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in INDEX_BITS:
            raise _corrupt(f"has an invalid index width {bits!r} (1..8)")
        extra = sorted(set(arrays) - {"codebook", "indices"})
        if extra:
            raise _corrupt(f"carries unexpected arrays {extra}")
        codebook = require_array(arrays, "codebook", cls.kind)
        indices = require_array(arrays, "indices", cls.kind)
        if codebook.dtype != CODEBOOK_DTYPE or codebook.dim() != 1 or not 1 <= codebook.numel() <= 1 << bits:
            raise _corrupt(f"codebook is {tuple(codebook.shape)} {codebook.dtype}, expected 1..{1 << bits} "
                           f"float16 centroids for {bits}-bit indices")
        if not torch.isfinite(codebook).all():
            raise _corrupt("codebook holds NaN or infinity")
        rows, cols = matrix_dims(shape)
        want = (rows, packed_row_bytes(cols, bits, INDEX_BITS))
        if indices.dtype != torch.uint8 or tuple(indices.shape) != want:
            raise _corrupt(f"indices are {tuple(indices.shape)} {indices.dtype}, expected {want} uint8")
        padded = cols if bits == 8 else cols + (-cols) % 8  # the padding codes fill the last packed group
        labels = unpack_codes(indices, bits, padded, widths=INDEX_BITS)  # (R, padded)
        if labels[:, :cols].numel() and int(labels[:, :cols].max()) >= codebook.numel():
            raise _corrupt(f"has an index outside its codebook of {codebook.numel()} centroids")
        if labels[:, cols:].any():
            raise _corrupt("has non-zero padding indices")
        return cls(codebook, indices, bits, shape)
