"""The encoding: how one tensor is represented, and the arrays that represent it.

Every compressed weight in modelpress is an `Encoding`. Encodings are plain data with a
`decode()`; they know nothing of modules or files. They compose by holding other encodings (a
sparse tensor whose kept values are quantised), so `arrays()` and `meta()` flatten nested parts
with dotted prefixes and `from_parts` rebuilds them, through a registry keyed by the `kind`
string that is written into files.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from modelpress.encodings.views import matrix_dims
from modelpress.errors import FormatError

__all__ = ["Encoding", "register_encoding", "encoding_from_parts", "ENCODINGS"]

ENCODINGS: dict[str, type["Encoding"]] = {}


def register_encoding(cls: type["Encoding"]) -> type["Encoding"]:
    """Class decorator: make `cls` loadable under the name in its `kind` attribute."""
    if cls.kind in ENCODINGS:
        raise ValueError(f"encoding kind {cls.kind!r} registered twice")
    ENCODINGS[cls.kind] = cls
    return cls


class Encoding(ABC):
    """A tensor's representation: arrays plus the JSON-able facts needed to decode them."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the decoded tensor."""

    @abstractmethod
    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense tensor this encoding stands for."""

    @abstractmethod
    def arrays(self) -> dict[str, torch.Tensor]:
        """Every array needed to rebuild the encoding, by part name (nested parts dotted)."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON-able description (with `kind`) that, with `arrays()`, rebuilds the encoding."""

    @classmethod
    @abstractmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "Encoding":
        """Rebuild from `meta()` and `arrays()`; must validate both (they may come from a hostile file)."""

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, columns) of the matrix view of the decoded tensor (see encodings/views.py)."""
        return matrix_dims(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays that store this tensor (what it costs on disk before entropy coding)."""
        return sum(a.numel() * a.element_size() for a in self.arrays().values())

    def describe(self) -> str:
        """A short human description ("int4 asym g32", "sparse", ...) for logs and reports."""
        return self.kind

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)


def encoding_from_parts(meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> Encoding:
    """Rebuild any registered encoding from what `meta()`/`arrays()` produced."""
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        raise FormatError("encoding metadata has no 'kind' string; the file is corrupt, re-save the model")
    cls = ENCODINGS.get(meta["kind"])
    if cls is None:
        raise FormatError(
            f"unknown encoding kind {meta['kind']!r} (known: {sorted(ENCODINGS)}); "
            "the file was written by a newer modelpress, upgrade to read it"
        )
    return cls.from_parts(meta, arrays)


def sub_arrays(arrays: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The arrays of a nested part, with the `prefix.` removed."""
    dotted = prefix + "."
    return {k[len(dotted) :]: v for k, v in arrays.items() if k.startswith(dotted)}


def require_array(arrays: dict[str, torch.Tensor], name: str, kind: str) -> torch.Tensor:
    if name not in arrays:
        raise FormatError(f"{kind} encoding is missing its {name!r} array; the file is corrupt, re-save the model")
    return arrays[name]


def wrapped_parts(kind: str, meta: dict[str, Any], arrays: dict[str, torch.Tensor], own: str,
                  inner_kinds: tuple[str, ...], corrupt: Callable[[str], FormatError]) -> tuple[Encoding, torch.Tensor]:
    """The inner encoding and the one array of their own that a wrapper encoding (an inner weight plus a
    per-column array: input scales, a column order) stores, the metadata and the array names checked."""
    shape = check_shape(meta, kind)
    inner_meta = meta.get("inner")
    if not isinstance(inner_meta, dict) or inner_meta.get("kind") not in inner_kinds:
        found = inner_meta.get("kind") if isinstance(inner_meta, dict) else None
        raise corrupt(f"has an inner encoding of kind {found!r}; allowed: {list(inner_kinds)}")
    extra = sorted(k for k in arrays if k != own and not k.startswith("inner."))
    if extra:
        raise corrupt(f"carries unexpected arrays {extra}")
    inner = encoding_from_parts(inner_meta, sub_arrays(arrays, "inner"))
    if tuple(inner.shape) != shape:
        raise corrupt(f"inner shape {tuple(inner.shape)} is not {shape}")
    return inner, require_array(arrays, own, kind)


def check_shape(meta: dict[str, Any], kind: str) -> tuple[int, ...]:
    """Validate a `shape` entry from untrusted metadata."""
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape) or len(shape) > 8:
        raise FormatError(f"{kind} encoding has an invalid shape {shape!r}; the file is corrupt, re-save the model")
    return tuple(shape)
