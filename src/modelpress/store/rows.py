"""Typed catalogue rows, each checked field by field as it is read (a catalogue may be hostile), and
the version's root hash.

A version's id is its root hash: BLAKE3-256 of the canonical JSON (sorted keys, no spaces) of
`{"model", "parent", "manifest", "files", "tensors": [[name, dtype, shape, chunks], ...]}`. As in a
git tree, it names everything a load uses: each tensor's name, dtype, shape and ordered chunk ids,
each support file's path and chunk id, the manifest and the parent. Each chunk id is in turn the
BLAKE3 of the chunk's raw bytes. Codecs are not in it, on purpose: a codec is how a chunk's bytes
are stored, not what they are (one content may be stored with any codec, and the first file
written for an id is kept), and a reader checks every decoded chunk against its id, so a tampered
codec or parameter can only make a chunk fail that check. Readers recompute the root hash of
every version they serve (`Version.check`), so swapping two tensors' chunk lists in the catalogue
is an IntegrityError, not swapped weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import blake3

from modelpress.codecs import Codec, codec_from
from modelpress.errors import FormatError, IntegrityError
from modelpress.store.objects import ID_PATTERN, ChunkHeader

__all__ = ["ChunkRow", "TensorRecord", "VersionInfo", "Version", "version_id", "chunk_row", "tensor_row",
           "file_row", "json_column", "is_id"]

MAX_DIMS = 16
MAX_DIM = 1 << 40


def is_id(value: Any) -> bool:
    return isinstance(value, str) and ID_PATTERN.match(value) is not None


def _is_size(value: Any, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


@dataclass(frozen=True)
class ChunkRow:
    """A chunk as the catalogue describes it. `stored_size` counts payload bytes (padding excluded)."""
    id: str
    codec: Codec
    raw_size: int
    stored_size: int
    base: str | None = None

    def header(self) -> ChunkHeader:
        return ChunkHeader(self.codec, self.raw_size, self.base)


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class VersionInfo:
    id: str
    model: str
    parent: str | None
    created: float
    message: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Version:
    """Everything a load of one version uses, as the catalogue holds it."""
    info: VersionInfo
    manifest: dict[str, Any]
    tensors: tuple[TensorRecord, ...]
    files: dict[str, str]  # relative path -> chunk id

    def root_hash(self) -> str:
        return version_id(self.info.model, self.info.parent, self.manifest, self.tensors, self.files)

    def check(self) -> "Version":
        """This version, once its rows are shown to hash to its id (else IntegrityError)."""
        if self.root_hash() != self.info.id:
            raise IntegrityError(f"version {self.info.id[:12]} of {self.info.model!r}: its catalogue rows (tensors, "
                                 "chunk lists, files or manifest) do not hash to its id; the catalogue was changed "
                                 "or damaged: run `modelpress store verify` and restore it from a backup")
        return self


def version_id(model: str, parent: str | None, manifest: dict[str, Any], tensors, files: dict[str, str]) -> str:
    """The root hash (see the module docstring)."""
    body = json.dumps({"model": model, "parent": parent, "manifest": manifest, "files": files,
                       "tensors": [[t.name, t.dtype, list(t.shape), list(t.chunks)] for t in tensors]},
                      sort_keys=True, separators=(",", ":"))
    return blake3.blake3(body.encode("utf-8")).hexdigest()


def json_column(text: Any, kind: type, what: str) -> Any:
    """Parse a JSON column, insisting on the expected container type (rows may be hostile)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise FormatError(f"{what} is not valid JSON in the catalogue; the store is corrupt") from None
    if not isinstance(value, kind):
        raise FormatError(f"{what} has the wrong type in the catalogue; the store is corrupt")
    return value


def chunk_row(cid: Any, row: tuple, memo: dict | None = None) -> ChunkRow:
    """A `chunks` row (id, codec, params, raw_size, stored_size, base) checked field by field; `memo` keeps
    the codecs of params texts already parsed (most rows of a load share a few)."""
    codec_name, text, raw_size, stored_size, base = row
    if not is_id(cid):
        raise FormatError(f"invalid chunk id {cid!r} in the catalogue; the store is corrupt")
    where = f"chunk {cid[:12]}"
    key = (codec_name, text) if isinstance(codec_name, str) and isinstance(text, str) else None
    codec = memo.get(key) if memo is not None and key is not None else None
    if codec is None:
        try:
            codec = codec_from(codec_name, json_column(text, dict, f"{where}'s params"))
        except FormatError as exc:
            raise FormatError(f"{where} has a corrupt catalogue row ({exc})") from None
        if memo is not None and key is not None:
            memo[key] = codec
    if (not _is_size(raw_size, 1 << 40) or not _is_size(stored_size, 1 << 41)
            or not (base is None or (is_id(base) and base != cid)) or codec.delta != (base is not None)):
        raise FormatError(f"{where} has a corrupt catalogue row; run `modelpress store verify`")
    return ChunkRow(cid, codec, raw_size, stored_size, base)


def tensor_row(vid: str, row: tuple) -> TensorRecord:
    name, dtype, shape, chunks = row
    where = f"tensor {name!r} of version {vid[:12]}"
    shape_t, chunks_t = json_column(shape, list, where + " shape"), json_column(chunks, list, where + " chunks")
    if not isinstance(name, str) or not isinstance(dtype, str) or len(shape_t) > MAX_DIMS or not all(
            _is_size(d, MAX_DIM) for d in shape_t):
        raise FormatError(f"{where} has a corrupt catalogue row (name, dtype or shape)")
    if not all(is_id(c) for c in chunks_t):
        raise FormatError(f"{where} lists an invalid chunk id; the catalogue is corrupt")
    return TensorRecord(name, dtype, tuple(shape_t), tuple(chunks_t))


def version_info(row: tuple, tags: tuple[str, ...]) -> VersionInfo:
    vid, model, parent, created, message = row
    if (not is_id(vid) or not isinstance(model, str) or not (parent is None or is_id(parent))
            or type(created) not in (int, float) or not isinstance(message, str)):
        raise FormatError(f"version {str(vid)[:12]!r} has a corrupt catalogue row; the store is corrupt")
    return VersionInfo(vid, model, parent, float(created), message, tags)


def file_row(vid: str, row: tuple) -> tuple[str, str]:
    """A `files` row (path, chunk): a relative path that stays inside the model folder, and a chunk id."""
    path, cid = row
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path or path.startswith("/") or any(
            p in ("..", ".", "") for p in path.split("/")):
        raise FormatError(f"file name {path!r} in the catalogue escapes the store; the store is corrupt")
    if not is_id(cid):
        raise FormatError(f"version {vid[:12]} lists file {path!r} with an invalid chunk id; the catalogue is corrupt")
    return path, cid
