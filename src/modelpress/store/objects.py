"""Chunk files: content-addressed, with a small canonical header. The byte layout:

    offset 0   8 bytes   magic b"MPCHUNK\\x01"
    offset 8   4 bytes   header length H, little-endian uint32, H <= 4096
    offset 12  H bytes   header: UTF-8 JSON {"base": id|null, "codec": str, "params": {...}, "raw_size": int},
                         sorted keys, no spaces (only this canonical form is valid)
    then                 zero padding up to the codec's alignment (only `aligned` has one > 1)
    then                 the payload (the codec's output) to the end of the file

A chunk's id is the BLAKE3-256 hex digest of its *raw* bytes, so equal content is stored once
whatever codec encodes it, and every read can be checked against its name. Files live under the
key `chunks/<id[0:2]>/<id>` of the store's object store (backend.py).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

import blake3

from modelpress.codecs import ALIGNMENTS, Codec, codec_from
from modelpress.errors import FormatError

__all__ = ["ChunkHeader", "chunk_id", "chunk_key", "chunk_path", "file_hash", "MAGIC", "MAX_HEADER",
           "MAX_CHUNK_RAW", "HEAD_LIMIT", "ID_PATTERN", "MAX_DELTA_DEPTH", "stored_bound"]

MAGIC = b"MPCHUNK\x01"
MAX_HEADER = 4096
_LEN = struct.Struct("<I")
ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# The largest chunk a reader accepts (checked before anything is allocated for it). Writers cut
# tensors into chunks of 1-8 MiB and store a support file (<= limits.MAX_SUPPORT_FILE_BYTES, 64 MiB)
# as one chunk; stores written before rows over 4 MiB were cut between elements may hold one
# such row per chunk, hence the margin.
MAX_CHUNK_RAW = 256 << 20
MAX_DELTA_DEPTH = 4  # a delta may rest on a delta, but chains stay short so loads stay fast
HEAD_LIMIT = len(MAGIC) + _LEN.size + MAX_HEADER + max(ALIGNMENTS)  # no chunk's payload starts later


def stored_bound(raw_size: int) -> int:
    """The most payload bytes any codec writes for `raw_size` raw bytes (zstd's worst case and more)."""
    return raw_size + raw_size // 8 + 65536


def chunk_id(raw) -> str:
    """BLAKE3-256 of the raw bytes, as 64 lowercase hex digits."""
    return blake3.blake3(raw, max_threads=1).hexdigest()


def file_hash(data) -> str:
    """BLAKE3 of a whole chunk file: lets `verify` notice any changed bit, even one that decodes the same."""
    return blake3.blake3(data, max_threads=1).hexdigest()


def chunk_key(cid: str) -> str:
    """The object key of a chunk; refuses anything but a well-formed id (ids come from the catalogue and
    from files, which may be hostile: no path tricks)."""
    if not isinstance(cid, str) or not ID_PATTERN.match(cid):
        raise FormatError(f"invalid chunk id {cid!r} in the catalogue; the store is corrupt")
    return f"chunks/{cid[:2]}/{cid}"


def chunk_path(root, cid: str):
    """The chunk's file in a local store folder."""
    return root / chunk_key(cid)


@dataclass(frozen=True)
class ChunkHeader:
    codec: Codec
    raw_size: int
    base: str | None = None

    def to_bytes(self) -> bytes:
        body = json.dumps({"codec": self.codec.name, "params": self.codec.params(), "raw_size": self.raw_size,
                           "base": self.base}, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return MAGIC + _LEN.pack(len(body)) + body

    def head(self) -> bytes:
        """Everything before the payload: magic, length, header and the zero padding to the codec's alignment."""
        head = self.to_bytes()
        return head + bytes(-len(head) % self.codec.alignment)

    @classmethod
    def parse(cls, data: memoryview | bytes, where: str) -> tuple["ChunkHeader", int]:
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
                or type(fields["raw_size"]) is not int or not 0 <= fields["raw_size"] <= 1 << 40
                or not (fields["base"] is None or (isinstance(fields["base"], str) and ID_PATTERN.match(fields["base"])))):
            raise FormatError(f"{where}: chunk header fields are invalid; run `modelpress store verify`")
        try:
            codec = codec_from(fields["codec"], fields["params"])
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        header = cls(codec, fields["raw_size"], fields["base"])
        if header.to_bytes()[start:] != body:  # only the canonical encoding is valid
            raise FormatError(f"{where}: chunk header is not in canonical form; run `modelpress store verify`")
        offset = start + length
        pad = -offset % codec.alignment
        if offset + pad > len(data) or any(bytes(data[offset:offset + pad])):
            raise FormatError(f"{where}: chunk padding is truncated or not zero; run `modelpress store verify`")
        return header, offset + pad
