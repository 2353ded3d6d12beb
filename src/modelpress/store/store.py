"""`Store(path)`: the embedded, model-aware store (a folder with chunk files and a SQLite catalogue).

    store = Store.init("models.mpstore")
    vid = store.put(model, "minilm-int4", message="int4 preset")   # a compressed model or a state dict
    state = store.get("minilm-int4", names=["*.word_embeddings.*"])  # tensors as views of one arena
    model = store.load("minilm-int4")                               # the runnable model, rebuilt
    with store.open("minilm-int4") as lazy: lazy["model.pooler.dense.bias"]

Writes: chunk files first (atomic renames, fsynced), then one catalogue transaction makes the
version visible; a crash at any point leaves no partial version and loses nothing committed.
Reads: every chunk is hashed as it is decoded (or mapped, for the aligned layout) and refused if its
content does not match its name (loader.py).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import blake3
import torch
from torch import nn

from modelpress.errors import FormatError, ModelNotFoundError, ModelpressError
from modelpress.store import layout, loader
from modelpress.store.catalog import Catalog, TensorRecord, VersionInfo
from modelpress.store.codecs import NATIVE_AVAILABLE, codec_for
from modelpress.store.objects import (
    ALIGNED,
    MAX_CHUNK_RAW,
    aligned_params,
    reported_as_corrupt,
    ChunkHeader,
    CorruptChunkError,
    chunk_id,
    chunk_path,
    file_hash,
    read_chunk,
    read_raw_chunk_into,
    write_chunk,
)

__all__ = ["Store", "StoreError", "VersionNotFoundError", "CorruptChunkError", "VerifyReport", "GcReport"]

MARKER = "STORE"
STORE_FORMAT = "modelpress.store"
STORE_VERSION = 1
MAX_DELTA_DEPTH = 4  # a delta may rest on a delta, but chains stay short so loads stay fast
MIN_SAVING = 0.02  # a codec must save 2% over raw to be worth its decode time
WIDTH_CODECS = ("planes", "xor", "fans")  # codecs whose params name the element width
STORAGE_CODECS = ("raw", ALIGNED, "zstd", "planes", "fans")  # what `codecs=` may ask for (xor is chosen per chunk)


class StoreError(ModelpressError):
    """A store operation failed for a reason the user can act on."""


class VersionNotFoundError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    corrupt: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing


@dataclass(frozen=True)
class GcReport:
    chunks_removed: int
    bytes_removed: int
    temporaries_removed: int


def _is_float(dtype: str) -> bool:
    return dtype in layout.FLOAT_NAMES


class Store:
    """A model-aware store in a local folder."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        marker = self.root / MARKER
        if not marker.is_file():
            raise StoreError(f"{str(self.root)!r} is not a modelpress store: create one with `modelpress store init PATH`")
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{marker}: unreadable store marker; restore it from a backup") from None
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise FormatError(f"{marker}: not a modelpress store marker")
        if info.get("version") != STORE_VERSION:
            raise FormatError(f"{marker}: store format {info.get('version')!r} is not supported "
                              f"(this modelpress reads {STORE_VERSION}); upgrade modelpress")
        self.catalog = Catalog(self.root / "catalog.sqlite")
        self.catalog.check()

    @classmethod
    def init(cls, path: str | Path) -> "Store":
        """Create an empty store (or open the one already there)."""
        root = Path(path)
        if (root / MARKER).is_file():
            return cls(root)
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{str(root)!r} exists and is not empty: give a new or empty folder for the store")
        for sub in ("chunks", "tmp", "cache"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        catalog = Catalog(root / "catalog.sqlite")
        try:
            catalog.create()
        finally:
            catalog.close()
        (root / "lock").touch()
        tmp = root / "tmp" / f"{MARKER}.part"
        tmp.write_text(json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}), encoding="utf-8")
        os.replace(tmp, root / MARKER)
        return cls(root)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """Writers share the lock; gc takes it alone, so it never removes a chunk a writer is adding."""
        with open(self.root / "lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- writing ------------------------------------------------------------------------------

    def put(
        self,
        source: nn.Module | dict[str, torch.Tensor],
        model: str,
        parent: str | None = "latest",
        message: str = "",
        tags: tuple[str, ...] = (),
        codecs: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Store a model (or state dict) as a new version of `model`; returns the version id.

        `parent` (a ref or version id; None for none) is recorded, and tensors that changed little
        against it are stored as exact deltas when smaller. `codecs` maps tensor-name patterns to
        a codec name ('raw', 'aligned', 'zstd', 'planes', 'fans') to override the automatic choice for
        those tensors. 'aligned' is the layout for tensors whose load time matters more than their
        size: raw bytes on page boundaries in their chunk files, which `get`/`load` map straight
        from the page cache (no copy, no decode; never stored as deltas). A chunk the store already
        holds keeps the encoding it was first stored with.
        """
        _check_name(model, "model")
        for tag in tags:
            _check_name(tag, "tag")
        manifest, tensors, files = _describe_source(source)
        parent_id = self._parent(model, parent)
        parent_tensors = {t.name: t for t in self.catalog.tensors(parent_id)} if parent_id else {}
        with self._lock(exclusive=False):
            new_chunks: dict[str, tuple[ChunkHeader, int]] = {}
            records = []
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for name, tensor in tensors.items():
                    codec = _codec_override(name, codecs)
                    records.append(self._put_tensor(name, tensor, codec, parent_tensors.get(name), new_chunks, pool))
                    if progress:
                        progress(1)
            stored_files = {}
            for rel, data in files.items():
                raw = memoryview(data)
                cid = chunk_id(raw)
                self._write(cid, raw, "zstd", {}, None, new_chunks)
                stored_files[str(rel)] = cid
            vid = _version_id(model, parent_id, manifest, records, stored_files)
            with self.catalog.transaction() as db:
                for cid, (header, stored, digest) in new_chunks.items():
                    Catalog.insert_chunk(db, cid, header.codec, header.params, header.raw_size, stored, header.base,
                                         digest)
                Catalog.insert_version(db, vid, model, parent_id, message, manifest, records, stored_files)
                Catalog.set_ref(db, model, "latest", vid)
                for tag in tags:
                    Catalog.set_ref(db, model, tag, vid)
        return vid

    def _parent(self, model: str, parent: str | None) -> str | None:
        if parent is None:
            return None
        try:
            return self.catalog.resolve(model, parent)
        except KeyError as exc:
            if parent == "latest":
                return None  # the first version of a model has no parent
            raise VersionNotFoundError(str(exc.args[0])) from None

    def _put_tensor(self, name: str, tensor: torch.Tensor, codec: str | None, parent: TensorRecord | None,
                    new_chunks: dict, pool: ThreadPoolExecutor) -> TensorRecord:
        dtype = layout.dtype_name(tensor.dtype)
        shape = tuple(tensor.shape)
        raw = layout.tensor_bytes(tensor)
        width = tensor.element_size()
        aligned = {"target": layout.ALIGNED_CHUNK_BYTES, "multiple": layout.PAGE} if codec == ALIGNED else {}
        spans = layout.split_rows(len(raw), shape, width, **aligned)
        if codec is None:
            codec = self._choose_codec(raw[: spans[0][1]] if spans else raw, dtype, width)
        params = {"width": width} if codec in WIDTH_CODECS else {}
        bases = list(parent.chunks) if parent and parent.dtype == dtype and parent.shape == shape else []
        if len(bases) != len(spans) or codec == ALIGNED:  # an aligned chunk is mapped as it is: never a delta
            bases = []
        jobs = []
        for i, (off, length) in enumerate(spans):
            piece = raw[off:off + length]
            base = bases[i] if bases else None
            jobs.append(pool.submit(self._encode_chunk, piece, codec, params, base, dtype, width))
        ids = []
        for job in jobs:
            cid, header, payload = job.result()
            ids.append(cid)
            if payload is not None and cid not in new_chunks:
                new_chunks[cid] = write_chunk(self.root, cid, header, payload)
        return TensorRecord(name, dtype, shape, tuple(ids))

    def _choose_codec(self, sample: memoryview, dtype: str, width: int) -> str:
        """The smallest candidate on a sample chunk, unless it saves too little to pay for decoding.

        Where `fans` is built it replaces `planes` as the float candidate: it is smaller on anything
        weight-sized, and on tiny chunks (a LayerNorm's 1.5 KB), where `planes` can win by a few
        bytes, it decodes some 20x faster (measured: 5 vs 109 us per chunk)."""
        if _is_float(dtype):
            candidates = (["fans"] if NATIVE_AVAILABLE and width in (2, 4) else ["planes"]) + ["zstd"]
        else:
            candidates = ["zstd"]
        sizes = {"raw": len(sample)}
        for name in candidates:
            params = {"width": width} if name in WIDTH_CODECS else {}
            sizes[name] = len(codec_for(name).encode(sample, params))
        best = min(sizes, key=sizes.get)
        return best if sizes[best] < (1 - MIN_SAVING) * len(sample) else "raw"

    def _encode_chunk(self, piece: memoryview, codec: str, params: dict, base: str | None, dtype: str, width: int):
        """(id, header, payload or None when the store already has it)."""
        cid = chunk_id(piece)
        if self.catalog_has(cid):
            return cid, None, None
        if codec == ALIGNED:
            params = aligned_params(piece, layout.PAGE)
        payload = codec_for(codec).encode(piece, params)
        header = ChunkHeader(codec, params, len(piece))
        if base and base != cid and self._delta_depth(base) < MAX_DELTA_DEPTH:
            delta = codec_for("xor").encode(piece, {"width": width}, base=lambda: self._chunk_bytes(base))
            if len(delta) < len(payload):
                payload, header = delta, ChunkHeader("xor", {"width": width}, len(piece), base)
        return cid, header, payload

    def catalog_has(self, cid: str) -> bool:
        # a fresh connection per thread would be heavier; sqlite3 serialises access on this one
        return self.catalog.has_chunk(cid)

    def _delta_depth(self, cid: str) -> int:
        """How many deltas lie under `cid` (capped: a cycle in a hostile catalogue cannot hang us)."""
        depth = 0
        base = self.catalog.chunk(cid)[4]
        while base is not None and depth <= MAX_DELTA_DEPTH:
            depth += 1
            base = self.catalog.chunk(base)[4]
        return depth

    def _write(self, cid, raw, codec, params, base, new_chunks) -> None:
        if cid in new_chunks or self.catalog.has_chunk(cid):
            return
        payload = codec_for(codec).encode(raw, params)
        new_chunks[cid] = write_chunk(self.root, cid, ChunkHeader(codec, params, len(raw), base), payload)

    def tag(self, model: str, ref: str, tag: str) -> str:
        """Point `tag` at the version `ref` names; returns its id."""
        _check_name(tag, "tag")
        vid = self.resolve(model, ref)
        with self.catalog.transaction() as db:
            Catalog.set_ref(db, model, tag, vid)
        return vid

    # -- reading ------------------------------------------------------------------------------

    def resolve(self, model: str, ref: str = "latest") -> str:
        try:
            return self.catalog.resolve(model, ref)
        except KeyError as exc:
            raise VersionNotFoundError(str(exc.args[0])) from None

    def _chunk_bytes(self, cid: str, depth: int = 0) -> memoryview:
        """A chunk's raw bytes, decoded and verified (bases of deltas decoded first)."""
        codec, params, raw_size, _, base = self.catalog.chunk(cid)
        if raw_size > MAX_CHUNK_RAW:
            raise CorruptChunkError(f"chunk {cid[:12]} claims {raw_size} bytes; the catalogue is corrupt")
        out = bytearray(raw_size)
        self._decode_into(cid, memoryview(out), codec, params, base, depth)
        return memoryview(out)

    def _decode_into(self, cid: str, out: memoryview, codec: str, params: dict, base: str | None,
                     depth: int = 0, stored_size: int | None = None) -> None:
        if depth > MAX_DELTA_DEPTH:
            raise CorruptChunkError(f"chunk {cid[:12]} sits under too many deltas (a cycle?); the store is corrupt")
        with reported_as_corrupt(f"chunk {cid[:12]}"):
            if codec in ("raw", ALIGNED):  # the fast path: file -> arena, one copy
                header = read_raw_chunk_into(self.root, cid, out)
                payload = None
            else:
                header, payload = read_chunk(self.root, cid)
            if (header.codec, header.params, header.raw_size, header.base) != (codec, params, len(out), base):
                raise CorruptChunkError(
                    f"chunk {cid[:12]}'s header disagrees with the catalogue; run `modelpress store verify`")
            if payload is not None and stored_size is not None and payload.nbytes != stored_size:
                raise CorruptChunkError(f"chunk {cid[:12]} has a payload of the wrong size; run `modelpress store verify`")
            if payload is not None:
                codec_for(codec).decode_into(payload, out, params,
                                             base=(lambda: self._chunk_bytes(base, depth + 1)) if base else None)
        if blake3.blake3(out, max_threads=1).hexdigest() != cid:
            raise CorruptChunkError(f"chunk {cid[:12]} does not match its hash (corrupt); run `modelpress store verify`")

    def get(self, model: str, ref: str = "latest", names: list[str] | None = None,
            threads: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors of a version (all, or those matching `names` patterns) as views of one arena.

        Chunks are read, decoded and hashed by `threads` threads (default: one per CPU); tensors of
        the aligned layout are mapped copy-on-write from their chunk files instead of copied (see
        loader.py)."""
        vid = self.resolve(model, ref)
        records = [t for t in self.catalog.tensors(vid) if not names or any(fnmatch.fnmatchcase(t.name, p) for p in names)]
        if names and not records:
            raise VersionNotFoundError(f"no tensor of {model}@{ref} matches {names}: see `modelpress store get --list`")
        return self._materialise(records, threads)

    def _materialise(self, records: list[TensorRecord], threads: int | None) -> dict[str, torch.Tensor]:
        rows = self.catalog.chunks([cid for record in records for cid in record.chunks])
        plan = loader.plan(records, rows)
        try:
            return loader.run(self.root, plan, threads or os.cpu_count() or 1, self._decode_into)
        except (MemoryError, OverflowError):
            raise StoreError(f"cannot allocate {plan.size / 1e9:.1f} GB to load these tensors: ask for fewer "
                             "(names=...) or open() the version lazily") from None

    def manifest(self, model: str, ref: str = "latest") -> dict[str, Any]:
        return self.catalog.version(self.resolve(model, ref))[1]

    def load(self, model: str, ref: str = "latest", skeleton: nn.Module | None = None) -> nn.Module:
        """The runnable model of a version (compressed modules rebuilt from their encodings)."""
        from modelpress.formats.checkpoint import rebuild, validate_manifest

        vid = self.resolve(model, ref)
        manifest = self.catalog.version(vid)[1]
        if manifest.get("format") == "modelpress.state_dict":
            raise StoreError(f"{model}@{ref} holds a plain state dict, not a model: read it with get()")
        manifest = validate_manifest(manifest, self.root / "versions" / vid)
        listed = self.catalog.files(vid)
        for rel in listed:
            _safe_join(self.root, rel)  # (names come from the catalogue: refuse any that could be a path trick)
        files = {rel: bytes(self._chunk_bytes(cid)) for rel, cid in listed.items()}
        return rebuild(manifest, self.get(model, vid), files, self.root / "versions" / vid, skeleton)

    @contextmanager
    def open(self, model: str, ref: str = "latest") -> Iterator["LazyVersion"]:
        """Tensors decoded on first access (and verified), e.g. to read a few layers of a big model."""
        vid = self.resolve(model, ref)
        yield LazyVersion(self, {t.name: t for t in self.catalog.tensors(vid)})

    def log(self, model: str) -> list[VersionInfo]:
        versions = self.catalog.log(model)
        if not versions:
            raise VersionNotFoundError(f"model {model!r} is not in the store: see `modelpress store ls`")
        return versions

    def models(self) -> list[tuple[str, int]]:
        return self.catalog.models()

    def stored_bytes(self, model: str, ref: str = "latest", exclusive_of: str | None = None) -> int:
        """Bytes of the chunks a version uses (minus those its `exclusive_of` version also uses)."""
        vid = self.resolve(model, ref)
        used = _chunks_of(self.catalog, vid)
        if exclusive_of:
            used -= _chunks_of(self.catalog, self.resolve(model, exclusive_of))
        return sum(self.catalog.chunk(c)[3] for c in used)

    def diff(self, model: str, a: str, b: str) -> list[dict[str, Any]]:
        """Per tensor: added / removed / changed (with max |difference| and relative L2) / same."""
        ta = {t.name: t for t in self.catalog.tensors(self.resolve(model, a))}
        tb = {t.name: t for t in self.catalog.tensors(self.resolve(model, b))}
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
                va = self._materialise([x], None)[name].double()
                vb = self._materialise([y], None)[name].double()
                delta = vb - va
                rel = float(delta.norm() / va.norm().clamp_min(1e-30)) if va.is_floating_point() else float("nan")
                rows.append({"tensor": name, "status": "changed", "max_abs": float(delta.abs().max()), "rel_l2": rel,
                             "changed_chunks": sum(p != q for p, q in zip(x.chunks, y.chunks))})
        return rows

    # -- maintenance --------------------------------------------------------------------------

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Recheck every chunk: present, header consistent with the catalogue, content matches its hash."""
        ids = self.catalog.all_chunk_ids()
        corrupt, missing = [], []
        for cid in ids:
            try:
                self._chunk_bytes(cid)
                if file_hash(chunk_path(self.root, cid)) != self.catalog.file_hash(cid):  # a flip that decodes the same
                    raise CorruptChunkError(f"chunk {cid[:12]}'s file does not match its recorded hash")
            except CorruptChunkError:
                corrupt.append(cid)
            except FormatError as exc:
                (missing if "missing" in str(exc) else corrupt).append(cid)
            if progress:
                progress(1)
        missing += sorted(self.catalog.referenced_chunks() - set(ids))
        return VerifyReport(len(ids), tuple(corrupt), tuple(missing))

    def gc(self) -> GcReport:
        """Remove chunks no version uses, chunk files the catalogue does not know, and leftover temporaries."""
        with self._lock(exclusive=True):
            used = self.catalog.referenced_chunks()
            unused = [c for c in self.catalog.all_chunk_ids() if c not in used]
            with self.catalog.transaction() as db:
                db.executemany("DELETE FROM chunks WHERE id=?", [(c,) for c in unused])
            known = set(self.catalog.all_chunk_ids())
            removed = freed = 0
            for folder in (self.root / "chunks", self.root / "tmp", self.root / "cache"):
                if folder.is_symlink():  # never follow a link out of the store
                    raise StoreError(f"{folder} is a symbolic link; gc only works on a plain store folder")
            for sub in (self.root / "chunks").iterdir():
                if sub.is_symlink() or not sub.is_dir():
                    continue  # not ours: leave it alone rather than follow it
                for path in sub.iterdir():
                    if path.name not in known and (path.is_symlink() or path.is_file()):
                        freed += path.lstat().st_size
                        path.unlink()
                        removed += 1
            temporaries = 0
            for path in (self.root / "tmp").iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                temporaries += 1
            for path in (self.root / "cache").iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        return GcReport(removed, freed, temporaries)


class LazyVersion:
    """Mapping-like access to a version's tensors; each is decoded (and verified) on first access."""

    def __init__(self, store: Store, records: dict[str, TensorRecord]):
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
            self._cache[name] = self._store._materialise([self._records[name]], None)[name]
        return self._cache[name]


def _chunks_of(catalog: Catalog, vid: str) -> set[str]:
    used = {c for t in catalog.tensors(vid) for c in t.chunks} | set(catalog.files(vid).values())
    frontier = set(used)
    while frontier:
        bases = {catalog.chunk(c)[4] for c in frontier} - {None}
        frontier = bases - used
        used |= bases
    return used


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 200 or name.startswith((".", "-")) or any(
            c in name for c in "/\\\0\n") or ".." in name:
        raise StoreError(f"invalid {what} name {name!r}: use letters, digits, '-', '_', '.' (no '/', no '..')")


def _safe_join(root: Path, rel: str) -> Path:
    """root/rel, refusing absolute paths and '..' (file names come from the catalogue)."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or any(p in ("..", "") for p in parts):
        raise FormatError(f"file name {rel!r} in the catalogue escapes the store; the store is corrupt")
    return root.joinpath(*parts)


def _codec_override(name: str, codecs: dict[str, str] | None) -> str | None:
    for pattern, codec in (codecs or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            if codec not in STORAGE_CODECS:
                raise StoreError(f"codec {codec!r} for {pattern!r} is not a storage codec: use "
                                 f"{', '.join(STORAGE_CODECS)}")
            return codec
    return None


def _describe_source(source) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, bytes]]:
    from modelpress.formats.checkpoint import describe

    if isinstance(source, nn.Module):
        return describe(source)
    if isinstance(source, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in source.items()):
        return {"format": "modelpress.state_dict", "architecture": {"kind": "state_dict"}, "modules": {}}, source, {}
    raise StoreError("put takes an nn.Module or a dict of name -> tensor")


def _version_id(model, parent, manifest, records: list[TensorRecord], files: dict[str, str]) -> str:
    body = json.dumps({"model": model, "parent": parent, "manifest": manifest, "files": files,
                       "tensors": [[r.name, r.dtype, list(r.shape), list(r.chunks)] for r in records]},
                      sort_keys=True, separators=(",", ":"))
    return blake3.blake3(body.encode("utf-8")).hexdigest()


def _timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
