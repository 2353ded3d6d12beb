"""The store's writing section: `put` (a model or state dict becomes a new version) and `tag`.

Chunk files are written first, each atomically (a temporary under tmp/, fsynced, linked into place,
the folder fsynced), then one catalogue transaction makes the version visible. The first file
written for a chunk id is kept: where a file is there already (a concurrent writer's, or a stray
left by a killed one), it is adopted only once it has been read back and checked against its hash,
and a damaged one is replaced. That decision is made inside the catalogue transaction, which
writers take one at a time, so a file is never replaced once a catalogue row describes it.
"""

from __future__ import annotations

import fnmatch
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import blake3
import torch
from torch import nn

from modelpress.codecs import Codec, Zstd, choose, codec_class, codec_names, delta_codec
from modelpress.errors import ModelpressError, StoreError, VersionNotFoundError
from modelpress.formats.checkpoint import describe
from modelpress.limits import MAX_SUPPORT_FILE_BYTES
from modelpress.store import layout
from modelpress.store import planes as planes_
from modelpress.store.objects import HEAD_LIMIT, MAX_DELTA_DEPTH, ChunkHeader, chunk_id, chunk_key, file_hash, stored_bound
from modelpress.store.rows import ChunkRow, TensorRecord, Version, VersionInfo, version_id

__all__ = ["Writing", "check_name"]

_Written = dict[str, "tuple[ChunkRow, str] | tuple[ChunkHeader, bytes]"]  # id -> (row, file hash) or (ours, payload)


class Writing:
    """put() and tag(); mixed into Store (store.py), whose attributes these methods use."""

    def put(
        self,
        source: nn.Module | dict[str, torch.Tensor],
        model: str,
        parent: str | None = "latest",
        message: str = "",
        tags: tuple[str, ...] = (),
        codecs: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
        chunk_bytes: dict[str, int] | None = None,
        planes: list[str] | None = None,
    ) -> str:
        """Store a model (or state dict) as a new version of `model`; returns the version id.

        `parent` (a ref or version id; None for none) is recorded, and tensors that changed little
        against it are stored as exact deltas when smaller. `codecs` maps tensor-name patterns to
        a codec name ('raw', 'aligned', 'zstd', 'planes', 'fans') to override the automatic choice for
        those tensors. 'aligned' is the layout for tensors whose load time matters more than their
        size: raw bytes on page boundaries in their chunk files, which `get`/`load` map straight
        from the page cache (no copy, no decode; never stored as deltas). A chunk the store already
        holds keeps the encoding it was first stored with. `chunk_bytes` maps tensor-name patterns to
        the raw size of their row blocks (default 1 MiB): small blocks for a table read by lookups (a
        lookup reads only the blocks of its rows), e.g. {"*embed_tokens.weight": 16384}. `planes`: patterns of
        float32 tensors stored as a bfloat16 plane and a low 16-bit plane (store/planes.py), so that
        `load(precision="bf16")` reads only the high planes and `refine` the rest.
        """
        check_name(model, "model")
        for tag in tags:
            check_name(tag, "tag")
        overrides = _codec_overrides(codecs)
        blocks = _block_overrides(chunk_bytes)
        manifest, tensors, files = _describe_source(source)
        with self._lock(exclusive=False):
            parent_id = self._parent(model, parent)
            parent_tensors = {t.name: t for t in self.catalog.tensors(parent_id)} if parent_id else {}
            written: _Written = {}
            records = []
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for name, tensor in _by_planes(tensors, planes):
                    records.append(self._put_tensor(name, tensor, _override(name, overrides), parent_tensors.get(name),
                                                    written, pool, _override(name, blocks)))
                    if progress:
                        progress(1)
            stored_files = {str(rel): self._put_file(str(rel), data, written) for rel, data in files.items()}
            vid = version_id(model, parent_id, manifest, records, stored_files)
            version = Version(VersionInfo(vid, model, parent_id, 0.0, message), manifest, tuple(records), stored_files)
            with self.catalog.transaction() as catalog:
                for cid, entry in written.items():
                    settled = entry if isinstance(entry[0], ChunkRow) else self._settle(cid, *entry)
                    if settled is not None:
                        catalog.insert_chunk(*settled)
                catalog.insert_version(version)
                catalog.set_ref(model, "latest", vid)
                for tag in tags:
                    catalog.set_ref(model, tag, vid)
        return vid

    def tag(self, model: str, ref: str, tag: str) -> str:
        """Point `tag` at the version `ref` names; returns its id."""
        check_name(tag, "tag")
        vid = self.resolve(model, ref)
        with self.catalog.transaction() as catalog:
            catalog.set_ref(model, tag, vid)
        return vid

    def _parent(self, model: str, parent: str | None) -> str | None:
        if parent is None:
            return None
        try:
            return self.catalog.resolve(model, parent)
        except VersionNotFoundError:
            if parent == "latest":
                return None  # the first version of a model has no parent
            raise

    def _put_tensor(self, name: str, tensor: torch.Tensor, codec: type[Codec] | None, parent: TensorRecord | None,
                    written: _Written, pool: ThreadPoolExecutor, block: int | None = None) -> TensorRecord:
        dtype = layout.dtype_name(tensor.dtype)
        shape = tuple(tensor.shape)
        raw = layout.tensor_bytes(tensor)
        width = tensor.element_size()
        mapped = codec is not None and codec.page_aligned
        aligned = {"target": layout.ALIGNED_CHUNK_BYTES, "multiple": layout.PAGE} if mapped else {}
        if block is not None:  # row blocks of the size asked for (still page multiples where mapped)
            aligned = {**aligned, "target": block}
        spans = layout.split_rows(len(raw), shape, width, **aligned)
        if codec is None:
            floating = dtype in layout.FLOAT_NAMES or planes_.base_name(name) is not None  # a float's low plane too
            codec = type(choose(raw[: spans[0][1]] if spans else raw, width, floating))
        bases = list(parent.chunks) if parent and parent.dtype == dtype and parent.shape == shape else []
        if len(bases) != len(spans) or mapped:  # a mapped chunk is read as it is: never a delta
            bases = []
        jobs = [pool.submit(self._encode_chunk, raw[off:off + length], codec, bases[i] if bases else None, width)
                for i, (off, length) in enumerate(spans)]
        ids = []
        for job in jobs:
            cid, header, payload = job.result()
            ids.append(cid)
            if payload is not None and cid not in written:
                self._write_chunk(cid, header, payload, written)
        return TensorRecord(name, dtype, shape, tuple(ids))

    def _encode_chunk(self, piece: memoryview, codec_type: type[Codec], base: str | None, width: int):
        """(id, header, payload), or (id, None, None) when the catalogue has the chunk already."""
        cid = chunk_id(piece)
        if self.catalog.has_chunk(cid):
            return cid, None, None
        codec = codec_type.for_data(piece, width)
        payload = codec.encode(piece)
        header = ChunkHeader(codec, len(piece))
        if base and base != cid and self._delta_depth(base) < MAX_DELTA_DEPTH:
            delta = delta_codec(width)
            coded = delta.encode(piece, self.reader.read(self.catalog.chunk(base)))
            if len(coded) < len(payload):
                payload, header = coded, ChunkHeader(delta, len(piece), base)
        return cid, header, payload

    def _delta_depth(self, cid: str) -> int:
        """How many deltas lie under `cid` (capped: a cycle in a hostile catalogue cannot hang us)."""
        depth, base = 0, self.catalog.chunk(cid).base
        while base is not None and depth <= MAX_DELTA_DEPTH:
            depth += 1
            base = self.catalog.chunk(base).base
        return depth

    def _put_file(self, rel: str, data: bytes, written: _Written) -> str:
        if len(data) > MAX_SUPPORT_FILE_BYTES:
            raise StoreError(f"support file {rel!r} is {len(data)} bytes, more than the {MAX_SUPPORT_FILE_BYTES} a "
                             "store holds in one file")
        raw = memoryview(data)
        cid = chunk_id(raw)
        if cid not in written and not self.catalog.has_chunk(cid):
            codec = Zstd()
            self._write_chunk(cid, ChunkHeader(codec, len(raw)), codec.encode(raw), written)
        return cid

    def _write_chunk(self, cid: str, header: ChunkHeader, payload: bytes, written: _Written) -> None:
        """Write a new chunk file; where a file is there already, leave the decision to the commit (`_settle`)."""
        head = header.head()
        if self.backend.put_if_absent(chunk_key(cid), [head, payload]):
            digest = blake3.blake3(head, max_threads=1)
            digest.update(payload)
            written[cid] = (ChunkRow(cid, header.codec, header.raw_size, len(payload), header.base), digest.hexdigest())
        else:
            written[cid] = (header, payload)

    def _settle(self, cid: str, header: ChunkHeader, payload: bytes) -> tuple[ChunkRow, str] | None:
        """Inside the commit: the row for a chunk whose file existed when we wrote it. None when another writer's
        committed row describes it already; else the file, if it checks out, or ours in place of a damaged one."""
        if self.catalog.has_chunk(cid):
            return None
        adopted = self._adopt(cid, header.raw_size)
        if adopted is not None:
            return adopted
        head = header.head()
        self.backend.put(chunk_key(cid), [head, payload])
        return ChunkRow(cid, header.codec, header.raw_size, len(payload), header.base), file_hash(head + payload)

    def _adopt(self, cid: str, raw_size: int) -> tuple[ChunkRow, str] | None:
        """The row of an existing chunk file that reads back intact (hash checked), or None."""
        try:
            data = self.backend.get(chunk_key(cid), HEAD_LIMIT + stored_bound(raw_size))
            header, offset = ChunkHeader.parse(data, f"chunk {cid[:12]}")
            if header.raw_size != raw_size or header.codec.delta != (header.base is not None):
                return None
            row = ChunkRow(cid, header.codec, raw_size, len(data) - offset, header.base)
            digest = file_hash(data)
            self.reader.read(row, expect_file=digest)
            return row, digest
        except (ModelpressError, FileNotFoundError):
            return None  # damaged, unreadable or gone: ours replaces it


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 200 or name.startswith((".", "-")) or any(
            c in name for c in "/\\\0\n") or ".." in name:
        raise StoreError(f"invalid {what} name {name!r}: use letters, digits, '-', '_', '.' (no '/', no '..')")


def _codec_overrides(codecs: dict[str, str] | None) -> list[tuple[str, type[Codec]]]:
    allowed = codec_names(per_tensor_only=True)
    out = []
    for pattern, name in (codecs or {}).items():
        if name not in allowed:
            raise StoreError(f"codec {name!r} for {pattern!r} is not a storage codec: use {', '.join(allowed)}")
        out.append((pattern, codec_class(name)))
    return out


def _by_planes(tensors: dict[str, torch.Tensor], patterns: list[str] | None):
    """(name, tensor) to store: float32 tensors matching `patterns` as their two planes (store/planes.py)."""
    for name, tensor in tensors.items():
        if patterns and tensor.dtype == torch.float32 and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            hi, lo = planes_.split(tensor)
            high, low = planes_.plane_names(name)
            yield high, hi
            yield low, lo
        else:
            if planes_.base_name(name) is not None:
                raise StoreError(f"tensor name {name!r} ends like a precision plane; rename it")
            yield name, tensor


def _block_overrides(chunk_bytes: dict[str, int] | None) -> list[tuple[str, int]]:
    out = []
    for pattern, size in (chunk_bytes or {}).items():
        if type(size) is not int or not layout.MIN_BLOCK <= size <= layout.MAX_STEP:
            raise StoreError(f"row-block size {size!r} for {pattern!r}: give bytes from {layout.MIN_BLOCK} to "
                             f"{layout.MAX_STEP}")
        out.append((pattern, size))
    return out


def _override(name: str, overrides: list):
    for pattern, codec in overrides:
        if fnmatch.fnmatchcase(name, pattern):
            return codec
    return None


def _describe_source(source: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, bytes]]:
    if isinstance(source, nn.Module):
        return describe(source)
    if isinstance(source, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in source.items()):
        return {"format": "modelpress.state_dict", "architecture": {"kind": "state_dict"}, "modules": {}}, source, {}
    raise StoreError("put takes an nn.Module or a dict of name -> tensor")
