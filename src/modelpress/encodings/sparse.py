"""Sparse encoding: the kept values (themselves any encoding) plus where they sit.

A weight of shape (R, ...) is viewed as the matrix (R, C), C = prod(...), as quantisation views it
(`encodings.views.as_matrix`). A boolean mask says which entries are kept; the kept entries,
read row by row (row-major order), are the *values*, stored as any other encoding: a DenseTensor,
or a QuantizedTensor of the kept values (so "50% sparse, 4-bit" is a sparse tensor whose values
are quantised). When every row keeps the same number K of entries, the values are a (R, K) matrix,
so a quantised value encoding can have per-row (per output channel) or per-group scales; otherwise
they are a flat (nnz,) vector.

Positions are stored in one of three layouts, whichever is smallest for the mask (`choose_layout`,
sizes from the one table `position_bytes`). All bit streams use the rule of `encodings.packing`:
a row's codes form a little-endian bit stream in which code `j` of width `b` occupies bits
`[j*b, (j+1)*b)`, bit `k` of the stream being bit `k % 8` of byte `k // 8`; each row is padded
with zero bits to whole bytes (a row is `ceil(n*b / 8)` bytes) and padding bits must be zero.

- ``bitmask``: array ``mask``, uint8 (R, ceil(C/8)): one bit per entry, 1 = kept. Bit `j` of row
  `r` is entry (r, j). Costs C/8 bytes per row whatever the density.
- ``nm``: array ``nm``, uint8 (R, ceil((C/M) * b / 8)) with b = ceil(log2(binom(M, N))): each
  group of M consecutive columns keeps exactly N entries; the group's code is the rank of its
  M-bit pattern (bit `j` = column `j` of the group is kept) in the ascending list of all M-bit
  integers with exactly N bits set. 2:4 has 6 patterns (3 bits per 4 entries, 0.75 bit/entry;
  two 2-bit indices would cost 1 bit/entry); 4:8 has 70 (7 bits per 8 entries). Needs C % M == 0.
- ``csr``: arrays ``row_ptr``, (R+1,) int32 (int64 if nnz >= 2^31), and ``col``, (nnz,) int16
  (int32 if C > 2^15): row `r` keeps the columns ``col[row_ptr[r]:row_ptr[r+1]]``, strictly
  increasing, with row_ptr[0] = 0 and row_ptr[R] = nnz. Cheapest below about 6% density.

Arrays are written under their names; the values' own arrays under ``values.<part>``.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch

from modelpress.encodings.base import (
    Encoding,
    check_shape,
    encoding_from_parts,
    register_encoding,
    require_array,
    sub_arrays,
)
from modelpress.encodings.dense import DenseTensor
from modelpress.encodings.views import as_matrix, matrix_dims
from modelpress.errors import ConfigError, FormatError

__all__ = [
    "SparseLayout",
    "SparseTensor",
    "MAX_NM_GROUP",
    "choose_layout",
    "nm_pattern",
    "pack_bits",
    "position_bytes",
    "sparsify",
    "unpack_bits",
]

MAX_NM_GROUP = 16  # largest M of an N:M pattern (its rank table has 2^M entries)


class SparseLayout(str, Enum):
    BITMASK = "bitmask"
    NM = "nm"
    CSR = "csr"


# ---------------------------------------------------------------- bit streams


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, n) integer codes in [0, 2^bits) -> (R, ceil(n*bits/8)) uint8, LSB-first bit stream per row."""
    rows, n = codes.shape
    planes = (codes.to(torch.int32).unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32)) & 1  # (R, n, b)
    stream = planes.to(torch.uint8).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, (-n * bits) % 8)).view(rows, -1, 8)  # (R, bytes, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (R, ceil(n*bits/8)) uint8 -> (R, n) int32 codes. Padding bits must be zero."""
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != _stream_bytes(n, bits):
        raise FormatError(f"packed bits of shape {tuple(packed.shape)} {packed.dtype} do not hold {n} {bits}-bit codes "
                          "per row; the file is corrupt, re-save the model")
    stream = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(rows, -1)  # (R, bytes*8)
    if stream[:, n * bits:].any():
        raise FormatError("packed bits have non-zero padding; the file is corrupt, re-save the model")
    planes = stream[:, : n * bits].reshape(rows, n, bits).to(torch.int32)
    return (planes << torch.arange(bits, dtype=torch.int32)).sum(-1, dtype=torch.int32)


def _stream_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


# ---------------------------------------------------------------- N:M pattern ranks


def nm_pattern(n: int, m: int) -> tuple[int, int]:
    """Validate an N:M pattern (1 <= N < M <= MAX_NM_GROUP)."""
    for v in (n, m):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"N:M pattern {n}:{m} must be two integers, e.g. 2:4")
    if not 1 <= n < m <= MAX_NM_GROUP:
        raise ConfigError(f"N:M pattern {n}:{m} is not valid: keep N of every M with 1 <= N < M <= {MAX_NM_GROUP}")
    return n, m


@functools.lru_cache(maxsize=None)
def _nm_tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rank -> M-bit pattern, pattern -> rank or -1, bits per rank) for N:M."""
    patterns = sorted(sum(1 << j for j in c) for c in itertools.combinations(range(m), n))
    to_pattern = torch.tensor(patterns, dtype=torch.int32)
    to_rank = torch.full((1 << m,), -1, dtype=torch.int32)
    to_rank[to_pattern.long()] = torch.arange(len(patterns), dtype=torch.int32)
    return to_pattern, to_rank, max(1, math.ceil(math.log2(len(patterns))))


def _group_patterns(mask: torch.Tensor, m: int) -> torch.Tensor:
    """(R, C) bool -> (R, C/M) int32 M-bit patterns, bit j = column j of the group."""
    rows, cols = mask.shape
    groups = mask.reshape(rows, cols // m, m).to(torch.int32)
    return (groups << torch.arange(m, dtype=torch.int32)).sum(-1, dtype=torch.int32)


def _is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = mask.shape
    return cols % m == 0 and bool((mask.reshape(rows, -1, m).sum(-1) == n).all())


# ---------------------------------------------------------------- the size table


def _ptr_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < 2**31 else torch.int64


def _col_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= 2**15 else torch.int32


def position_bytes(layout: SparseLayout, rows: int, cols: int, nnz: int, nm: tuple[int, int] | None = None) -> int:
    """Bytes the positions of an (rows, cols) mask with `nnz` kept entries take in `layout`."""
    layout = SparseLayout(layout)
    if layout is SparseLayout.BITMASK:
        return rows * _stream_bytes(cols, 1)
    if layout is SparseLayout.NM:
        if nm is None:
            raise ConfigError("the nm layout needs its N:M pattern")
        n, m = nm
        return rows * _stream_bytes(cols // m, _nm_tables(n, m)[2])
    itemsize = {torch.int16: 2, torch.int32: 4, torch.int64: 8}
    return (rows + 1) * itemsize[_ptr_dtype(nnz)] + nnz * itemsize[_col_dtype(cols)]


def choose_layout(mask: torch.Tensor, nm: tuple[int, int] | None = None) -> SparseLayout:
    """The smallest layout for this (R, C) mask; `nm` makes the N:M layout eligible if the mask fits it."""
    rows, cols = mask.shape
    nnz = int(mask.sum())
    eligible = [SparseLayout.BITMASK, SparseLayout.CSR]  # ties go to the earlier layout
    if nm is not None and _is_nm(mask, *nm):
        eligible.insert(0, SparseLayout.NM)
    return min(eligible, key=lambda layout: position_bytes(layout, rows, cols, nnz, nm))


# ---------------------------------------------------------------- the encoding


ValueEncoder = Callable[[torch.Tensor], Encoding]


def sparsify(
    w: torch.Tensor,
    mask: torch.Tensor,
    nm: tuple[int, int] | None = None,
    layout: SparseLayout | str | None = None,
    encode_values: ValueEncoder | None = None,
) -> "SparseTensor":
    """Keep the entries of `w` where `mask` is true; `encode_values` encodes the kept values (default: dense).

    The values handed to `encode_values` are (R, K) when every row keeps K entries, else (nnz,).
    """
    if mask.shape != w.shape or mask.dtype != torch.bool:
        raise ConfigError(f"mask must be a bool tensor of the weight's shape {tuple(w.shape)}")
    W, M = as_matrix(w.detach()), as_matrix(mask)  # (R, C)
    if nm is not None:
        nm = nm_pattern(*nm)
        if not _is_nm(M, *nm):
            raise ConfigError(f"the mask does not keep exactly {nm[0]} of every {nm[1]} entries in each row")
    layout = choose_layout(M, nm) if layout is None else SparseLayout(layout)
    counts = M.sum(1)
    kept = W[M]  # (nnz,) row-major
    if counts.numel() and bool((counts == counts[0]).all()):
        kept = kept.reshape(W.shape[0], int(counts[0]))  # (R, K)
    values = (encode_values or DenseTensor)(kept.contiguous())
    if values.numel != kept.numel() or tuple(values.shape) != tuple(kept.shape):
        raise ConfigError(f"the value encoder returned shape {values.shape}, expected {tuple(kept.shape)}")
    return SparseTensor(values=values, positions=_encode_positions(M, layout, nm), layout=layout, nm=nm,
                        nnz=int(counts.sum()), tensor_shape=tuple(w.shape))


def _encode_positions(M: torch.Tensor, layout: SparseLayout, nm: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    rows, cols = M.shape
    if layout is SparseLayout.BITMASK:
        return {"mask": pack_bits(M, 1)}
    if layout is SparseLayout.NM:
        if nm is None or not _is_nm(M, *nm):
            raise ConfigError("the nm layout needs a mask that keeps exactly N of every M entries")
        _, to_rank, bits = _nm_tables(*nm)
        return {"nm": pack_bits(to_rank[_group_patterns(M, nm[1]).long()], bits)}
    nnz = int(M.sum())
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    row_ptr[1:] = M.sum(1).cumsum(0)
    col = M.nonzero()[:, 1]  # row-major, columns increasing within a row
    return {"row_ptr": row_ptr.to(_ptr_dtype(nnz)), "col": col.to(_col_dtype(cols))}


_POSITION_ARRAYS = {SparseLayout.BITMASK: ("mask",), SparseLayout.NM: ("nm",), SparseLayout.CSR: ("row_ptr", "col")}


@register_encoding
@dataclass(frozen=True, eq=False)
class SparseTensor(Encoding):
    """Kept values (any encoding) plus their positions as a bitmask, N:M ranks or compressed rows."""

    kind = "sparse"
    values: Encoding  # (R, K) if every row keeps K entries, else (nnz,); row-major order
    positions: dict[str, torch.Tensor]  # the layout's arrays (see the module docstring)
    layout: SparseLayout
    nm: tuple[int, int] | None
    nnz: int
    tensor_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor_shape

    @property
    def density(self) -> float:
        return self.nnz / max(self.numel, 1)

    def matrix_mask(self) -> torch.Tensor:
        """(R, C) bool: which entries are kept."""
        rows, cols = self.matrix_shape
        if self.layout is SparseLayout.BITMASK:
            return unpack_bits(self.positions["mask"], 1, cols).bool()
        if self.layout is SparseLayout.NM:
            n, m = self.nm
            to_pattern, _, bits = _nm_tables(n, m)
            ranks = unpack_bits(self.positions["nm"], bits, cols // m)  # (R, C/M)
            patterns = to_pattern[ranks.long()]
            return ((patterns.unsqueeze(-1) >> torch.arange(m, dtype=torch.int32)) & 1).bool().reshape(rows, cols)
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        mask[self.row_indices(), self.positions["col"].long()] = True
        return mask

    def mask(self) -> torch.Tensor:
        """Bool tensor of the decoded shape: which entries are kept."""
        return self.matrix_mask().reshape(self.tensor_shape)

    def row_indices(self) -> torch.Tensor:
        """(nnz,) long: the row of each kept value (CSR layout)."""
        counts = self.positions["row_ptr"].long().diff()
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    def kept_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(nnz,) decoded kept values, row-major."""
        return self.values.decode(dtype).reshape(-1)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.matrix_shape
        out = torch.zeros(rows, cols, dtype=dtype)
        out[self.matrix_mask()] = self.kept_values(dtype)
        return out.reshape(self.tensor_shape)

    def arrays(self) -> dict[str, torch.Tensor]:
        out = dict(self.positions)
        out.update({f"values.{k}": v for k, v in self.values.arrays().items()})
        return out

    def meta(self) -> dict[str, Any]:
        out = {"kind": self.kind, "shape": list(self.tensor_shape), "layout": self.layout.value, "nnz": self.nnz,
               "values": self.values.meta()}
        if self.nm is not None:
            out["nm"] = list(self.nm)
        return out

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "SparseTensor":
        shape = check_shape(meta, cls.kind)
        try:
            layout = SparseLayout(meta.get("layout"))
        except ValueError:
            raise _corrupt(f"has an unknown layout {meta.get('layout')!r}") from None
        numel = math.prod(shape)
        rows, cols = matrix_dims(shape)
        nnz = meta.get("nnz")
        if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= numel:
            raise _corrupt(f"has an invalid nnz {nnz!r} for {numel} entries")
        nm = _read_nm(meta, layout, cols)
        names = set(_POSITION_ARRAYS[layout])
        extra = sorted(k for k in arrays if not k.startswith("values.") and k not in names)
        if extra:
            raise _corrupt(f"({layout.value}) carries unexpected arrays {extra}")
        positions = {k: require_array(arrays, k, cls.kind) for k in _POSITION_ARRAYS[layout]}
        counts = _checked_row_counts(positions, layout, nm, nnz, rows, cols)
        if int(counts.sum()) != nnz:
            raise _corrupt(f"positions hold {int(counts.sum())} kept entries, metadata says nnz={nnz}")
        enc = cls(values=_read_values(meta, sub_arrays(arrays, "values")), positions=positions, layout=layout,
                  nm=nm, nnz=nnz, tensor_shape=shape)
        vshape = tuple(enc.values.shape)
        uniform = len(vshape) == 2 and vshape[0] == rows and bool((counts == vshape[1]).all())
        if vshape != (nnz,) and not uniform:
            raise _corrupt(f"values have shape {vshape}; expected ({nnz},) or ({rows}, K) with K kept in every row")
        return enc


def _corrupt(what: str) -> FormatError:
    return FormatError(f"sparse encoding {what}; the file is corrupt, re-save the model")


def _read_nm(meta: dict[str, Any], layout: SparseLayout, cols: int) -> tuple[int, int] | None:
    raw = meta.get("nm")
    if raw is None:
        if layout is SparseLayout.NM:
            raise _corrupt("uses the nm layout without an N:M pattern")
        return None
    if not isinstance(raw, list) or len(raw) != 2:
        raise _corrupt(f"has an invalid N:M pattern {raw!r}")
    try:
        n, m = nm_pattern(*raw)
    except ConfigError:
        raise _corrupt(f"has an invalid N:M pattern {raw!r}") from None
    if cols % m:
        raise _corrupt(f"has N:M pattern {n}:{m} but rows of {cols} entries")
    return n, m


def _read_values(meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> Encoding:
    """The values' encoding (any kind but sparse: no nesting of sparse in sparse)."""
    values_meta = meta.get("values")
    if not isinstance(values_meta, dict) or values_meta.get("kind") == SparseTensor.kind:
        raise _corrupt("has missing or nested-sparse values metadata")
    enc = encoding_from_parts(values_meta, arrays)
    if enc.numel != meta["nnz"]:
        raise _corrupt(f"has {enc.numel} values for nnz={meta['nnz']}")
    return enc


def _checked_row_counts(p: dict[str, torch.Tensor], layout: SparseLayout, nm: tuple[int, int] | None, nnz: int,
                        rows: int, cols: int) -> torch.Tensor:
    """(R,) kept entries per row, after checking the position arrays' shapes, dtypes and ranges."""
    for name in _POSITION_ARRAYS[layout]:
        if name != "col" and (p[name].dim() == 0 or p[name].shape[0] != rows + (name == "row_ptr")):
            raise _corrupt(f"{name} array has shape {tuple(p[name].shape)}, not one entry per row of {rows}")
    if layout is SparseLayout.BITMASK:
        return unpack_bits(p["mask"], 1, cols).sum(1)
    if layout is SparseLayout.NM:
        n, m = nm
        ranks = unpack_bits(p["nm"], _nm_tables(n, m)[2], cols // m)
        if ranks.numel() and int(ranks.max()) >= math.comb(m, n):
            raise _corrupt(f"has an N:M rank out of range [0, {math.comb(m, n)})")
        return torch.full((rows,), cols // m * n, dtype=torch.int64)
    row_ptr, col = p["row_ptr"], p["col"]
    if row_ptr.dtype != _ptr_dtype(nnz) or tuple(row_ptr.shape) != (rows + 1,):
        raise _corrupt(f"row_ptr is {tuple(row_ptr.shape)} {row_ptr.dtype}, expected ({rows + 1},) {_ptr_dtype(nnz)}")
    if col.dtype != _col_dtype(cols) or tuple(col.shape) != (nnz,):
        raise _corrupt(f"col is {tuple(col.shape)} {col.dtype}, expected ({nnz},) {_col_dtype(cols)}")
    ptr = row_ptr.long()
    counts = ptr.diff()
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((counts < 0).any()):
        raise _corrupt("row_ptr does not rise from 0 to nnz")
    c = col.long()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= cols):
        raise _corrupt(f"has a column index outside [0, {cols})")
    rising = c[1:] > c[:-1]  # within a row, columns must strictly increase
    starts = torch.zeros(c.numel(), dtype=torch.bool)
    starts[ptr[1:-1][ptr[1:-1] < c.numel()]] = True
    if bool((~rising & ~starts[1:]).any()):
        raise _corrupt("has column indices that do not strictly increase within a row")
    return counts
