"""The small objects of a remote: its marker, version records and refs (layout: docs/STORE_FORMAT.md, "Remotes").

    REMOTE                      {"format": "modelpress.remote", "version": 1}
    chunks/<id[0:2]>/<id>       chunk files, byte for byte as in a local store
    versions/<version id>       a version record (below), immutable, zstd-compressed; a child's coded
                                against its parent's record (a fine-tune's record is a few hundred bytes)
    refs/<model>/<ref>          {"version": <version id>}, replaced only by compare-and-swap

A version record carries everything a reader needs without touching a chunk: the version's rows
(checked against its root hash, as a local catalogue's are) and the catalogue row and file hash of
every chunk it uses, bases of deltas included. Every field is checked as it is read (a remote may be
hostile), with the same row checks as the local catalogue.

Stored form: RECORD_MAGIC, then the base record's id (64 hex digits, or 64 "-" for none), then one zstd
frame of the record's JSON. A base is always the version's parent, and the frame is compressed with the
base record's JSON as a raw-content dictionary: a child that changes a few tensors repeats nothing of
its parent's names, chunk rows and manifest. Chains are at most MAX_CHAIN deep (a writer starts afresh
below that), so a reader makes at most MAX_CHAIN + 1 requests for a record. Plain JSON records (written
before compression) are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import zstandard

from modelpress.errors import FormatError, IntegrityError, StoreError
from modelpress.safeparse import load_json
from modelpress.store.objects import ID_PATTERN
from modelpress.store.rows import ChunkRow, Version, chunk_row, file_row, is_id, tensor_row, version_info

__all__ = ["MARKER_KEY", "REMOTE_FORMAT", "REMOTE_VERSION", "READABLE_VERSIONS", "MAX_RECORD", "MAX_REF", "MAX_CHAIN",
           "RECORD_MAGIC", "RemoteVersion", "ref_key", "version_key", "record_json", "encode_record", "decode_record",
           "encode_ref", "decode_ref", "marker_bytes", "check_marker", "split_ref"]

MARKER_KEY = "REMOTE"
REMOTE_FORMAT = "modelpress.remote"
REMOTE_VERSION = 2  # 2: compressed, parent-coded records; push markers that name a base record for its chunks
READABLE_VERSIONS = (1, 2)  # a version 1 remote (plain JSON records) is read, and made version 2 by the next push
MAX_RECORD = 64 << 20  # a version record (MiniLM's is ~40 KB; a 7B model's a few MB)
MAX_REF = 4096
MAX_CHAIN = 8  # a record is coded against at most this many ancestors' records in a row
RECORD_MAGIC = b"MPVR1"
_NO_BASE = b"-" * 64
_LEVEL = 19  # records are small: the slowest level costs milliseconds


def marker_bytes() -> bytes:
    return json.dumps({"format": REMOTE_FORMAT, "version": REMOTE_VERSION}, sort_keys=True).encode()


def check_marker(data: bytes, url: str) -> int:
    """The remote's format version, if this modelpress reads it."""
    info = load_json(data, f"remote {url}'s marker", MAX_REF)
    if not isinstance(info, dict) or info.get("format") != REMOTE_FORMAT:
        raise FormatError(f"{url} is not a modelpress remote (its REMOTE marker is wrong): give another URL")
    if info.get("version") not in READABLE_VERSIONS:
        raise FormatError(f"remote {url} has format {info.get('version')!r}; this modelpress reads "
                          f"{' and '.join(map(str, READABLE_VERSIONS))}: upgrade modelpress")
    return info["version"]


def ref_key(model: str, ref: str) -> str:
    return f"refs/{model}/{ref}"


def version_key(vid: str) -> str:
    if not is_id(vid):
        raise FormatError(f"invalid version id {vid!r} on the remote; the remote is damaged")
    return f"versions/{vid}"


@dataclass(frozen=True)
class RemoteVersion:
    version: Version
    chunks: dict[str, tuple[ChunkRow, str]]  # every chunk the version needs (bases included): (row, file hash)
    size: int = 0  # bytes of the record as read
    body: bytes = b""  # the record's JSON, as read (the dictionary its children's records are coded with)
    bases: tuple[str, ...] = ()  # the records it was decoded through (its parent's first): each must stay

    @property
    def id(self) -> str:
        return self.version.info.id

    def chunk_bytes(self, cid: str) -> int:
        """The size of a chunk's file: head (with padding) plus payload."""
        row = self.chunks[cid][0]
        return len(row.header().head()) + row.stored_size


def record_json(version: Version, chunks: dict[str, tuple[ChunkRow, str]]) -> bytes:
    """The record's JSON (deterministic: sorted keys, no spaces)."""
    info = version.info
    body = {
        "format": "modelpress.version", "id": info.id, "model": info.model, "parent": info.parent,
        "created": info.created, "message": info.message, "manifest": version.manifest,
        "tensors": [[t.name, t.dtype, list(t.shape), list(t.chunks)] for t in version.tensors],
        "files": version.files,
        "chunks": {cid: [row.codec.name, row.codec.params(), row.raw_size, row.stored_size, row.base, digest]
                   for cid, (row, digest) in sorted(chunks.items())},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_record(version: Version, chunks: dict[str, tuple[ChunkRow, str]],
                  base: RemoteVersion | None = None) -> bytes:
    """The stored form of a record, coded against `base` (the parent's record as the remote holds it) where one
    is given and its chain is short enough."""
    text = record_json(version, chunks)
    if base is not None and (base.id != version.info.parent or len(base.bases) >= MAX_CHAIN or not base.body):
        base = None
    if base is None:
        return RECORD_MAGIC + _NO_BASE + zstandard.ZstdCompressor(level=_LEVEL).compress(text)
    dictionary = zstandard.ZstdCompressionDict(base.body, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return RECORD_MAGIC + base.id.encode() + zstandard.ZstdCompressor(level=_LEVEL, dict_data=dictionary).compress(text)


def _unwrap(data: bytes, vid: str, where: str, base_of: Callable[[str], "RemoteVersion"] | None):
    """(JSON text, base record or None) of a stored record."""
    if not data.startswith(RECORD_MAGIC):
        return data, None  # a plain JSON record
    head = len(RECORD_MAGIC) + 64
    base_id = bytes(data[len(RECORD_MAGIC):head])
    base = None
    if base_id != _NO_BASE:
        text = base_id.decode("ascii", "replace")
        if not is_id(text) or text == vid or base_of is None:
            raise FormatError(f"{where} names an invalid base record; the remote is damaged")
        base = base_of(text)
    try:
        params = {}
        if base is not None:
            params["dict_data"] = zstandard.ZstdCompressionDict(base.body, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        reader = zstandard.ZstdDecompressor(**params).stream_reader(bytes(data[head:]))
        parts, size = [], 0
        while size <= MAX_RECORD:  # never more than the limit in memory, whatever the frame claims
            part = reader.read(1 << 20)
            if not part:
                break
            parts.append(part)
            size += len(part)
        text = b"".join(parts)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where} does not decompress ({exc}); the remote is damaged") from None
    if len(text) > MAX_RECORD:
        raise FormatError(f"{where} expands past {MAX_RECORD} bytes; the remote is damaged")
    return text, base


def decode_record(data: bytes, vid: str, url: str,
                  base_of: Callable[[str], "RemoteVersion"] | None = None) -> RemoteVersion:
    """A version record, every field checked; its rows must hash to `vid` and it must describe every chunk its
    tensors, files and deltas use (IntegrityError or FormatError otherwise). `base_of` reads the record a
    compressed one names as its base (which must be its parent)."""
    where = f"version record {vid[:12]} on {url}"
    text, base = _unwrap(data, vid, where, base_of)
    body = load_json(text, where, MAX_RECORD, "the remote is damaged: run `modelpress store remote verify`")
    keys = {"format", "id", "model", "parent", "created", "message", "manifest", "tensors", "files", "chunks"}
    if not isinstance(body, dict) or set(body) != keys or body["format"] != "modelpress.version" or body["id"] != vid:
        raise FormatError(f"{where} is not a version record; the remote is damaged")
    if not all(isinstance(body[k], t) for k, t in (("manifest", dict), ("tensors", list), ("files", dict),
                                                   ("chunks", dict))):
        raise FormatError(f"{where} has fields of the wrong type; the remote is damaged")
    try:
        info = version_info((vid, body["model"], body["parent"], body["created"], body["message"]), ())
        tensors = []
        for item in body["tensors"]:
            if not isinstance(item, list) or len(item) != 4 or not isinstance(item[2], list) \
                    or not isinstance(item[3], list):
                raise FormatError("a tensor entry is malformed")
            tensors.append(tensor_row(vid, (item[0], item[1], json.dumps(item[2]), json.dumps(item[3]))))
        files = dict(file_row(vid, (path, cid)) for path, cid in body["files"].items())
        chunks: dict[str, tuple[ChunkRow, str]] = {}
        memo: dict = {}
        for cid, row in body["chunks"].items():
            if not isinstance(row, list) or len(row) != 6 or not isinstance(row[1], dict) \
                    or not (isinstance(row[5], str) and ID_PATTERN.match(row[5])):
                raise FormatError(f"chunk {str(cid)[:12]}'s entry is malformed")
            chunks[cid] = (chunk_row(cid, (row[0], json.dumps(row[1], sort_keys=True), row[2], row[3], row[4]), memo),
                           row[5])
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}; the remote is damaged") from None
    version = Version(info, body["manifest"], tuple(tensors), files)
    try:
        version.check()
    except IntegrityError:
        raise IntegrityError(f"{where} does not hash to its name; the remote is damaged: run `modelpress store "
                             "remote verify`") from None
    if base is not None and base.id != info.parent:
        raise FormatError(f"{where} is coded against a record other than its parent's; the remote is damaged")
    needed = [c for t in tensors for c in t.chunks] + list(files.values())
    while needed:
        cid = needed.pop()
        if cid not in chunks:
            raise FormatError(f"{where} uses chunk {cid[:12]} but does not describe it; the remote is damaged")
        if chunks[cid][0].base is not None:
            needed.append(chunks[cid][0].base)
    bases = (base.id,) + base.bases if base is not None else ()
    if len(bases) > MAX_CHAIN:  # (a base read earlier, from a cache, has not been counted by the reader)
        raise FormatError(f"{where} is coded against a chain of more than {MAX_CHAIN} records; the remote is damaged")
    return RemoteVersion(version, chunks, len(data), bytes(text), bases)


def encode_ref(vid: str) -> bytes:
    return json.dumps({"version": vid}).encode()


def decode_ref(data: bytes, model: str, ref: str, url: str) -> str:
    where = f"ref {model}@{ref} on {url}"
    body = load_json(data, where, MAX_REF, "the remote is damaged")
    if not isinstance(body, dict) or set(body) != {"version"} or not is_id(body["version"]):
        raise FormatError(f"{where} is not a valid ref; the remote is damaged: re-push the model")
    return body["version"]


def split_ref(spec: str) -> tuple[str, str]:
    """`MODEL[@REF]` -> (model, ref or 'latest')."""
    model, _, ref = spec.partition("@")
    if not model:
        raise StoreError(f"{spec!r} names no model: write MODEL or MODEL@VERSION")
    return model, ref or "latest"
