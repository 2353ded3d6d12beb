"""Chunk files: content-addressed, written atomically, read defensively.

A chunk's id is the BLAKE3-256 hex digest of its *raw* bytes, so equal content is stored once
whatever codec encodes it, and every read can be checked against its name. File layout:

    offset 0   8 bytes   magic b"MPCHUNK\\x01"
    offset 8   4 bytes   header length H, little-endian uint32, H <= 4096
    offset 12  H bytes   header: UTF-8 JSON {"codec": str, "params": {...}, "raw_size": int, "base": id|null}
    offset 12+H          payload (the codec's output) to the end of the file

except for the `aligned` codec, whose payload (the raw bytes) starts at the next multiple of its
`params["align"]` at or after 12+H, the gap filled with zero bytes: the payload then sits on a page
boundary of the file and a load can map it instead of copying it.

Files live at `chunks/<id[0:2]>/<id>`. A file is written to `tmp/`, fsynced, then renamed into
place, so a reader never sees a partial chunk under its final name.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import xxhash

from modelpress.errors import FormatError

__all__ = ["ChunkHeader", "chunk_id", "file_hash", "write_chunk", "read_chunk", "read_raw_chunk_into", "chunk_path",
           "alignment", "aligned_params", "CorruptChunkError", "reported_as_corrupt", "MAGIC", "MAX_HEADER", "MAX_CHUNK_RAW", "HEAD_LIMIT", "ID_PATTERN",
           "ALIGNED", "ALIGNMENTS"]

MAGIC = b"MPCHUNK\x01"
MAX_HEADER = 4096
_LEN = struct.Struct("<I")
ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNK_RAW = 1 << 31  # no chunk we write is near this; a larger claim is a corrupt catalogue
ALIGNED = "aligned"  # the codec whose payload is padded to an aligned file offset
ALIGNMENTS = tuple(1 << k for k in range(6, 17))  # 64 B .. 64 KiB: cache line to the largest common page


class CorruptChunkError(FormatError):
    """A chunk's bytes do not hash to its name (bit rot, tampering, a partial copy)."""


@contextmanager
def reported_as_corrupt(where: str):
    """Re-raise a chunk's format errors as CorruptChunkError naming it (a missing chunk stays what it is)."""
    try:
        yield
    except CorruptChunkError:
        raise
    except FormatError as exc:
        if "missing" in str(exc):
            raise
        raise CorruptChunkError(f"{where} is corrupt ({exc}); run `modelpress store verify`") from None


_CHECK_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def alignment(params: dict[str, Any]) -> int:
    """The `align` parameter of an `aligned` chunk, its parameters checked (they come from a file or a
    catalogue row)."""
    align, check = params.get("align"), params.get("xxh3_128")
    if (set(params) != {"align", "xxh3_128"} or type(align) is not int or align not in ALIGNMENTS
            or not isinstance(check, str) or not _CHECK_PATTERN.match(check)):
        raise FormatError(f"aligned codec parameters {params!r} are invalid: align must be a power of two "
                          f"from 64 to 65536 and xxh3_128 32 hex digits; run `modelpress store verify`")
    return align


def aligned_params(raw, align: int) -> dict[str, Any]:
    """Parameters of an `aligned` chunk holding `raw`: the alignment and the bytes' XXH3-128.

    Why a second hash: an aligned chunk exists to load at page-cache speed, and BLAKE3 (the chunk's
    name) runs at ~4 GB/s per core here, which alone costs twice what safetensors' whole load does.
    XXH3-128 runs at ~25 GB/s and catches corruption (bit rot, truncation, a wrong file) as surely;
    it is not collision resistant, so `verify` and everything but the mapped load still check BLAKE3.
    """
    return {"align": align, "xxh3_128": xxhash.xxh3_128_hexdigest(raw)}


def chunk_id(raw) -> str:
    """BLAKE3-256 of the raw bytes, as 64 lowercase hex digits."""
    return blake3.blake3(raw, max_threads=1).hexdigest()


@dataclass(frozen=True)
class ChunkHeader:
    codec: str
    params: dict[str, Any]
    raw_size: int
    base: str | None = None

    def to_bytes(self) -> bytes:
        body = json.dumps({"codec": self.codec, "params": self.params, "raw_size": self.raw_size, "base": self.base},
                          sort_keys=True, separators=(",", ":")).encode("utf-8")
        return MAGIC + _LEN.pack(len(body)) + body

    def head(self) -> bytes:
        """Everything before the payload: magic, length, header and (for `aligned` chunks) the zero padding."""
        head = self.to_bytes()
        return head + bytes(-len(head) % alignment(self.params)) if self.codec == ALIGNED else head

    @classmethod
    def parse(cls, data: memoryview, where: str) -> tuple["ChunkHeader", int]:
        """The header and the payload's offset (after any padding, which must be zeros and present in `data`);
        every field checked (the file may be hostile)."""
        if len(data) < len(MAGIC) + _LEN.size or bytes(data[: len(MAGIC)]) != MAGIC:
            raise FormatError(f"{where}: not a modelpress chunk (bad magic); run `modelpress store verify`")
        (length,) = _LEN.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        if length > MAX_HEADER or start + length > len(data):
            raise FormatError(f"{where}: chunk header length {length} is invalid; run `modelpress store verify`")
        body = bytes(data[start:start + length])
        try:
            fields = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise FormatError(f"{where}: chunk header is not valid JSON; run `modelpress store verify`") from None
        if (not isinstance(fields, dict) or set(fields) != {"base", "codec", "params", "raw_size"}
                or not isinstance(fields["codec"], str) or not isinstance(fields["params"], dict)
                or isinstance(fields["raw_size"], bool) or not isinstance(fields["raw_size"], int)
                or not 0 <= fields["raw_size"] <= 1 << 40
                or not (fields["base"] is None or (isinstance(fields["base"], str) and ID_PATTERN.match(fields["base"])))):
            raise FormatError(f"{where}: chunk header fields are invalid; run `modelpress store verify`")
        header = cls(fields["codec"], fields["params"], fields["raw_size"], fields["base"])
        if header.to_bytes()[len(MAGIC) + _LEN.size:] != body:  # only the canonical encoding is valid
            raise FormatError(f"{where}: chunk header is not in canonical form; run `modelpress store verify`")
        offset = start + length
        if header.codec == ALIGNED:
            try:
                pad = -offset % alignment(header.params)
            except FormatError as exc:
                raise FormatError(f"{where}: {exc}") from None
            if offset + pad > len(data) or any(data[offset:offset + pad]):
                raise FormatError(f"{where}: chunk padding is truncated or not zero; run `modelpress store verify`")
            offset += pad
        return header, offset


HEAD_LIMIT = len(MAGIC) + _LEN.size + MAX_HEADER + max(ALIGNMENTS)  # no chunk's payload starts later


def chunk_path(root: Path, cid: str) -> Path:
    if not ID_PATTERN.match(cid):  # ids come from the catalogue, which may be hostile: no path tricks
        raise FormatError(f"invalid chunk id {cid!r} in the catalogue; the store is corrupt")
    return root / "chunks" / cid[:2] / cid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_hash(path: Path) -> str:
    """BLAKE3 of a whole chunk file: lets `verify` notice any changed bit, even one that decodes the same."""
    return blake3.blake3(path.read_bytes(), max_threads=1).hexdigest()


def write_chunk(root: Path, cid: str, header: ChunkHeader, payload: bytes) -> tuple[ChunkHeader, int, str]:
    """Store a chunk unless a file for it exists; returns the header, payload size and file hash *on disk*.

    The first file written for an id wins and is never replaced: a concurrent writer that encoded
    the same content differently adopts the existing file's header for its catalogue row, so the
    catalogue always describes the bytes that are really there.
    """
    final = chunk_path(root, cid)
    if final.exists():
        with open(final, "rb") as fh:
            head = fh.read(HEAD_LIMIT)
        existing, offset = ChunkHeader.parse(memoryview(head), f"chunk {cid[:12]}")
        return existing, final.stat().st_size - offset, file_hash(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp" / f"{cid}.{uuid.uuid4().hex}.part"
    head = header.head()
    digest = blake3.blake3(head, max_threads=1)
    digest.update(payload)
    with open(tmp, "wb") as fh:
        fh.write(head)
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, final)  # fails if another writer got there first: theirs stays
    except FileExistsError:
        os.unlink(tmp)
        return write_chunk(root, cid, header, payload)
    os.unlink(tmp)
    _fsync_dir(final.parent)
    return header, len(payload), digest.hexdigest()


def read_chunk(root: Path, cid: str) -> tuple[ChunkHeader, memoryview]:
    """The header and payload of a stored chunk (not yet decoded or verified)."""
    path = chunk_path(root, cid)
    try:
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        raise FormatError(f"chunk {cid[:12]} is missing from the store; run `modelpress store verify`") from None
    except OSError as exc:
        raise FormatError(f"chunk {cid[:12]} cannot be read ({exc.strerror}); run `modelpress store verify`") from None
    header, offset = ChunkHeader.parse(data, f"chunk {cid[:12]}")
    return header, data[offset:]


def read_raw_chunk_into(root: Path, cid: str, out: memoryview) -> ChunkHeader:
    """For `raw` and `aligned` chunks: read the payload straight into `out` (one copy, from the page cache)."""
    path = chunk_path(root, cid)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise FormatError(f"chunk {cid[:12]} is missing from the store; run `modelpress store verify`") from None
    except OSError as exc:
        raise FormatError(f"chunk {cid[:12]} cannot be read ({exc.strerror}); run `modelpress store verify`") from None
    with fh:
        head = fh.read(HEAD_LIMIT)
        header, offset = ChunkHeader.parse(memoryview(head), f"chunk {cid[:12]}")
        if header.codec not in ("raw", ALIGNED) or header.raw_size != len(out):
            return header  # the caller notices the mismatch and reports it
        fh.seek(offset)
        got = fh.readinto(out)
        if got != len(out) or fh.read(1):
            raise FormatError(f"chunk {cid[:12]} has {got} payload bytes, expected {len(out)}; run `modelpress store verify`")
    return header
