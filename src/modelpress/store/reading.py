"""The store's reading section: `get` (tensors as views of one arena), `load` (the runnable model),
`open` (lazy access), `manifest`, `stored_bytes` and `diff`.

Every version served is first checked against its root hash (rows.py), and every chunk against its
id as it lands (reader.py), so neither a tampered catalogue nor a damaged file reaches a caller.
"""

from __future__ import annotations

import fnmatch
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from modelpress.errors import ConfigError, LimitExceededError, ModelpressError, StoreError, VersionNotFoundError
from modelpress.formats.checkpoint import rebuild, validate_manifest
from modelpress.limits import MAX_SUPPORT_FILE_BYTES
from modelpress.store import loader, planes
from modelpress.store.rows import TensorRecord, Version

__all__ = ["Reading", "LazyVersion"]


class Reading:
    """get(), load(), open(), manifest(), stored_bytes(), diff(); mixed into Store (store.py)."""

    def version(self, model: str, ref: str = "latest") -> Version:
        """A version's catalogue rows, checked against its root hash."""
        return self.catalog.version(self.resolve(model, ref)).check()

    def get(self, model: str, ref: str = "latest", names: list[str] | None = None,
            threads: int | None = None, precision: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of a version (all, or those matching `names` patterns) as views of one arena.

        Chunks are read, decoded and hashed by `threads` threads (default: one per CPU); tensors of
        the aligned layout are mapped copy-on-write from their chunk files instead of copied (see
        loader.py). Tensors stored by planes (planes.py) come back whole, or with `precision="bf16"`
        from their high planes alone (only those chunks are read)."""
        version = self.version(model, ref)
        records = [t for t in version.tensors
                   if not names or any(fnmatch.fnmatchcase(planes.base_name(t.name) or t.name, p) for p in names)]
        if names and not records:
            raise VersionNotFoundError(f"no tensor of {model}@{ref} matches {names}: see `modelpress store get --list`")
        return self._materialise(_at_precision(records, precision), threads)

    def refine(self, model_: nn.Module, model: str, ref: str = "latest", threads: int | None = None) -> int:
        """Bring a model loaded with `precision="bf16"` to the exact stored values, in place, reading only the low
        planes (planes.py); returns how many tensors were refined."""
        lows = [t for t in self.version(model, ref).tensors if t.name.endswith(planes.LO)]
        state = model_.state_dict(keep_vars=True)
        for record in lows:
            target = state.get(planes.base_name(record.name))
            if target is None or target.dtype != torch.float32 or tuple(target.shape) != record.shape:
                raise StoreError(f"the model has no float32 tensor {planes.base_name(record.name)!r} of shape "
                                 f"{list(record.shape)}: refine the model that load(precision=...) gave")
        loaded = self._land(lows, threads)
        for record in lows:
            planes.refine_into(state[planes.base_name(record.name)].data, loaded[record.name])
        return len(lows)

    def _materialise(self, records: list[TensorRecord], threads: int | None) -> dict[str, torch.Tensor]:
        return _joined(self._land(records, threads))

    def _land(self, records: list[TensorRecord], threads: int | None) -> dict[str, torch.Tensor]:
        rows = self.catalog.chunks([cid for record in records for cid in record.chunks])
        plan = loader.plan(records, rows, self.backend.can_map)
        try:
            return loader.run(self.reader, plan, threads or os.cpu_count() or 1)
        except MemoryError as exc:
            if isinstance(exc, ModelpressError):
                raise
            raise LimitExceededError(f"out of memory loading {plan.size / 1e9:.2f} GB of tensors: ask for fewer "
                                     "(names=...) or open() the version lazily") from None

    def manifest(self, model: str, ref: str = "latest") -> dict[str, Any]:
        return self.version(model, ref).manifest

    def load(self, model: str, ref: str = "latest", skeleton: nn.Module | None = None,
             precision: str | None = None) -> nn.Module:
        """The runnable model of a version (compressed modules rebuilt from their encodings); with
        `precision="bf16"`, tensors stored by planes are read at bfloat16 precision only (`refine` reads the rest)."""
        version = self.version(model, ref)
        vid = version.info.id
        if version.manifest.get("format") == "modelpress.state_dict":
            raise StoreError(f"{model}@{ref} holds a plain state dict, not a model: read it with get()")
        where = self.root / "versions" / vid  # (names the version in messages; nothing is written there)
        manifest = validate_manifest(version.manifest, where)
        rows = self.catalog.chunks(version.files.values())
        files = {rel: bytes(self.reader.read(rows[cid], limit=MAX_SUPPORT_FILE_BYTES))
                 for rel, cid in version.files.items()}
        tensors = self._materialise(_at_precision(list(version.tensors), precision), None)
        return rebuild(manifest, tensors, files, where, skeleton)

    @contextmanager
    def open(self, model: str, ref: str = "latest") -> Iterator["LazyVersion"]:
        """Tensors decoded on first access (and verified), e.g. to read a few layers of a big model."""
        yield LazyVersion(self, {t.name: t for t in self.version(model, ref).tensors})

    def stored_bytes(self, model: str, ref: str = "latest", exclusive_of: str | None = None) -> int:
        """Bytes of the chunks a version uses (minus those its `exclusive_of` version also uses)."""
        used = self._chunks_of(self.version(model, ref))
        if exclusive_of:
            used -= self._chunks_of(self.version(model, exclusive_of))
        return sum(row.stored_size for row in self.catalog.chunks(sorted(used)).values())

    def added_bytes(self, model: str, ref: str, parent: str) -> tuple[int, int]:
        """What a version adds to this store over `parent`: (bytes of the chunk files it uses and the parent does
        not, heads included, as they lie on disk; bytes of the catalogue rows it and those chunks add)."""
        used = sorted(self._chunks_of(self.version(model, ref)) - self._chunks_of(self.version(model, parent)))
        files = sum(len(row.header().head()) + row.stored_size for row in self.catalog.chunks(used).values())
        return files, self.catalog.row_bytes(self.resolve(model, ref), used)

    def _chunks_of(self, version: Version) -> set[str]:
        return self.catalog.closure([c for t in version.tensors for c in t.chunks] + list(version.files.values()))

    def diff(self, model: str, a: str, b: str) -> list[dict[str, Any]]:
        """Per tensor: added / removed / changed (with max |difference| and relative L2) / same."""
        ta = {t.name: t for t in self.version(model, a).tensors}
        tb = {t.name: t for t in self.version(model, b).tensors}
        rows = []
        for name in sorted(set(ta) | set(tb)):
            x, y = ta.get(name), tb.get(name)
            if x is None or y is None:
                rows.append({"tensor": name, "status": "added" if x is None else "removed"})
            elif x.shape != y.shape or x.dtype != y.dtype:
                rows.append({"tensor": name, "status": "changed", "detail": f"{x.dtype}{list(x.shape)} -> {y.dtype}{list(y.shape)}"})
            elif x.chunks == y.chunks:
                rows.append({"tensor": name, "status": "same"})
            else:
                va = self._land([x], None)[name].double()
                vb = self._land([y], None)[name].double()
                delta = vb - va
                rel = float(delta.norm() / va.norm().clamp_min(1e-30)) if va.is_floating_point() else float("nan")
                rows.append({"tensor": name, "status": "changed", "max_abs": float(delta.abs().max()), "rel_l2": rel,
                             "changed_chunks": sum(p != q for p, q in zip(x.chunks, y.chunks))})
        return rows


PRECISIONS = (None, "bf16")


def _at_precision(records: list[TensorRecord], precision: str | None) -> list[TensorRecord]:
    """The records a load at `precision` reads: all, or ("bf16") all but the low planes."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use 'bf16' or None (exact)")
    return records if precision is None else [r for r in records if not r.name.endswith(planes.LO)]


def _joined(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors stored by planes put back together under their own names: both planes joined bit for bit, a high
    plane alone widened to float32 (exact); every other tensor as it is."""
    out = {}
    for name, tensor in tensors.items():
        base = planes.base_name(name)
        if base is None:
            out[name] = tensor
        elif name.endswith(planes.HI):
            low = tensors.get(base + planes.LO)
            out[base] = tensor.to(torch.float32) if low is None else planes.join(tensor, low)
    return out


class LazyVersion:
    """Mapping-like access to a version's tensors; each is decoded (and verified) on first access."""

    def __init__(self, store: Reading, records: dict[str, TensorRecord]):
        self._store, self._records, self._cache = store, records, {}

    def keys(self) -> list[str]:
        return list(self._records)

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            if name not in self._records:
                raise VersionNotFoundError(f"no tensor named {name!r} in this version")
            self._cache[name] = self._store._land([self._records[name]], None)[name]  # (a plane as it is stored)
        return self._cache[name]
