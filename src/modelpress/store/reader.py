"""The one chunk reader: load, get, delta bases, support files, stray checks and verify all read chunks here.

Landing a chunk into a caller's buffer (`land`) is a few system calls and one codec call, which all
release the GIL, so the loader's threads keep their cores busy: open (regular files only, never
through a link), fstat, then either a preadv of a verbatim payload straight into the buffer, a
read-only mapping of a large compressed file decoded from the page cache, or a preadv of a small
file into a per-thread scratch buffer and a decode; then a hash of the landed bytes (BLAKE3 of the
chunk's id, or for `aligned` chunks the XXH3-128 their parameters carry, see codecs/raw.py). The
file's head is compared with the bytes its catalogue row implies, so the header checks (canonical,
agreeing with the catalogue, zero padding) cost one comparison; only a mismatch is parsed, to say
what is wrong. Every read is bounded: a file must be exactly as long as its row says.

`read` returns one chunk's bytes in a fresh buffer, allocated only after the payload has been read
and the size it declares checked (bases of deltas, support files, and `verify`, which also hashes
the whole file). Mapping files is only done where the backend can map (backend.py); otherwise
whole objects are fetched.

Like any reader of mapped files, a load faults (SIGBUS) if a chunk file is truncated while it is
read; chunk files are immutable and no modelpress operation truncates one (`gc` unlinks, which
leaves mappings intact).
"""

from __future__ import annotations

import mmap
import os
from typing import Callable

import blake3

from modelpress import limits
from modelpress.errors import (
    CorruptChunkError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    MissingChunkError,
    ModelpressError,
    NotRegularFileError,
    StorageIOError,
)
from modelpress.store.backend import ObjectStore
from modelpress.store.objects import HEAD_LIMIT, MAX_CHUNK_RAW, MAX_DELTA_DEPTH, ChunkHeader, chunk_key, file_hash
from modelpress.store.rows import ChunkRow

__all__ = ["ChunkReader", "Scratch"]

_MAP_MIN = 64 << 10  # files at least this big are mapped to be decoded; smaller ones are read (cheaper)
_MAP_FLAGS = getattr(mmap, "MAP_SHARED", 0) | getattr(mmap, "MAP_POPULATE", 0)


class Scratch:
    """A thread's read buffer, grown as needed and reused: no fresh pages per chunk."""

    def __init__(self):
        self.buf = bytearray()

    def get(self, n: int) -> memoryview:
        if len(self.buf) < n:
            self.buf = bytearray(max(n, 2 * len(self.buf)))
        return memoryview(self.buf)[:n]


def _reported(exc: BaseException, row: ChunkRow) -> BaseException:
    """The error to raise for one met while reading a chunk: its format errors become CorruptChunkError naming
    it; missing, irregular, oversized and I/O errors stay what they are; an OSError becomes StorageIOError.
    (A plain function, not a context manager: the loader calls through here once per chunk.)"""
    where = f"chunk {row.id[:12]}"
    if isinstance(exc, (IntegrityError, NotRegularFileError, LimitExceededError)):
        return exc
    if isinstance(exc, FormatError):
        return CorruptChunkError(f"{where} is corrupt ({exc}); run `modelpress store verify`")
    if isinstance(exc, OSError) and not isinstance(exc, ModelpressError):
        return StorageIOError(f"{where} cannot be read ({exc.strerror or exc}); check the disk and run "
                              "`modelpress store verify`")
    if isinstance(exc, MemoryError) and not isinstance(exc, ModelpressError):
        return LimitExceededError(f"{where} could not be decoded: out of memory; free memory or load less")
    return exc


class ChunkReader:
    """Reads chunks of `backend`; `rows(id)` gives a chunk's catalogue row (for the bases of deltas)."""

    def __init__(self, backend: ObjectStore, rows: Callable[[str], ChunkRow]):
        self.backend, self.rows = backend, rows
        self._heads: dict = {}

    # -- the parts every path shares ------------------------------------------------------------

    def head(self, row: ChunkRow) -> bytes:
        """The bytes a chunk file must start with, given its row (memoised: rows share codecs and sizes)."""
        key = (row.codec, row.raw_size, row.base)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = row.header().head()
        return head

    def check(self, row: ChunkRow, out: memoryview, strong: bool = False) -> None:
        """Refuse landed bytes that do not hash to what the row says (`strong`: always BLAKE3, the id itself)."""
        quick = None if strong else row.codec.check(out)
        intact = quick if quick is not None else blake3.blake3(out, max_threads=1).hexdigest() == row.id
        if not intact:
            raise CorruptChunkError(f"chunk {row.id[:12]} does not match its hash (corrupt); "
                                    "run `modelpress store verify`")

    def _decode(self, row: ChunkRow, payload: memoryview, out: memoryview, depth: int) -> None:
        declared = row.codec.declared_size(payload)
        if declared is not None and declared != len(out):
            raise CorruptChunkError(f"chunk {row.id[:12]}'s payload declares {declared} bytes, its row {len(out)}; "
                                    "run `modelpress store verify`")
        base = None
        if row.base is not None:
            base_row = self.rows(row.base)
            if base_row.raw_size != row.raw_size:
                raise CorruptChunkError(f"chunk {row.id[:12]}'s base has another size; run `modelpress store verify`")
            base = self.read(base_row, depth + 1)
        row.codec.decode_into(payload, out, base)

    def _diagnose(self, row: ChunkRow, head: bytes, size: int | None) -> None:
        """Say what is wrong with a chunk file whose head or size (None: too large to read) is not what its row
        implies."""
        where = f"chunk {row.id[:12]}"
        header, offset = ChunkHeader.parse(memoryview(head), where)
        if header != row.header():
            raise CorruptChunkError(f"{where}'s header disagrees with the catalogue; run `modelpress store verify`")
        held = "more" if size is None else size - offset
        raise CorruptChunkError(f"{where} has {held} payload bytes, the catalogue says {row.stored_size}; "
                                "run `modelpress store verify`")

    def _open(self, row: ChunkRow) -> tuple[int, int]:
        """A descriptor of the chunk's file (a regular file, not through a link) and the file's size."""
        try:
            return self.backend.open(chunk_key(row.id))
        except FileNotFoundError:
            raise MissingChunkError(f"chunk {row.id[:12]} is missing from the store; run `modelpress store verify`"
                                    ) from None

    def _whole(self, row: ChunkRow) -> tuple[bytes, memoryview]:
        """The whole chunk file (read within its row's size) and its payload, the head checked."""
        head = self.head(row)
        size = len(head) + row.stored_size
        limits.check_allocation(size, f"chunk {row.id[:12]}")  # (so that a LimitExceededError below means: too long)
        try:
            data = self.backend.get(chunk_key(row.id), size)
        except FileNotFoundError:
            raise MissingChunkError(f"chunk {row.id[:12]} is missing from the store; run `modelpress store verify`"
                                    ) from None
        except LimitExceededError:
            self._diagnose(row, self.backend.get_range(chunk_key(row.id), 0, HEAD_LIMIT), None)
        if len(data) != size or not data.startswith(head):
            self._diagnose(row, data[:HEAD_LIMIT], len(data))
        return data, memoryview(data)[len(head):]

    @staticmethod
    def _check_size(row: ChunkRow, limit: int) -> None:
        if row.raw_size > limit:
            raise LimitExceededError(f"chunk {row.id[:12]} claims {row.raw_size} bytes, more than the {limit} a chunk "
                                     "can hold; the catalogue is corrupt: run `modelpress store verify`")

    # -- public ---------------------------------------------------------------------------------

    def read(self, row: ChunkRow, depth: int = 0, limit: int = MAX_CHUNK_RAW, expect_file: str | None = None,
             ) -> memoryview:
        """A chunk's raw bytes, decoded and checked by BLAKE3, in a fresh buffer (bases of deltas decoded first).

        The output is allocated only once the payload is read and agrees in size; `limit` caps the raw size;
        `expect_file` is the BLAKE3 of the whole file, checked too (`verify`)."""
        where = f"chunk {row.id[:12]}"
        if depth > MAX_DELTA_DEPTH:
            raise CorruptChunkError(f"{where} sits under too many deltas (a cycle?); the store is corrupt")
        self._check_size(row, limit)
        try:
            data, payload = self._whole(row)
            if expect_file is not None and file_hash(data) != expect_file:
                raise CorruptChunkError(f"{where}'s file does not match its recorded hash")
            declared = row.codec.declared_size(payload)
            if declared is not None and declared != row.raw_size:
                raise CorruptChunkError(f"{where}'s payload declares {declared} bytes, its row {row.raw_size}; "
                                        "run `modelpress store verify`")
            limits.check_allocation(row.raw_size, where)
            out = memoryview(bytearray(row.raw_size))
            self._decode(row, payload, out, depth)
        except (FormatError, OSError, MemoryError) as exc:
            raise _reported(exc, row) from None
        self.check(row, out, strong=True)
        return out

    def land(self, row: ChunkRow, out: memoryview, scratch: Scratch, check: bool = True) -> None:
        """Read, decode and check one chunk into `out` (exactly its raw size: a slice of a load arena)."""
        if row.raw_size > MAX_CHUNK_RAW:
            self._check_size(row, MAX_CHUNK_RAW)
        try:
            if not self.backend.can_map:
                self._decode(row, self._whole(row)[1], out, 0)
            else:
                self._land_fd(row, out, scratch)
        except (FormatError, OSError, MemoryError) as exc:
            raise _reported(exc, row) from None
        if check:
            self.check(row, out)

    def _land_fd(self, row: ChunkRow, out: memoryview, scratch: Scratch) -> None:
        head = self.head(row)
        size = len(head) + row.stored_size
        fd, actual = self._open(row)
        try:
            if actual != size:
                self._diagnose(row, os.pread(fd, HEAD_LIMIT, 0), actual)
            if row.codec.verbatim:  # straight into the arena: one copy from the page cache
                got = scratch.get(len(head))
                if os.preadv(fd, [got, out], 0) != size or not scratch.buf.startswith(head):
                    self._diagnose(row, os.pread(fd, HEAD_LIMIT, 0), actual)
                return
            if size >= _MAP_MIN and hasattr(mmap, "PROT_READ"):
                # decoded straight from the page cache; the mapping is left to the garbage collector rather than
                # closed: a view of it may live on in an exception's traceback
                mapping = mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
                if mapping[:len(head)] != head:
                    self._diagnose(row, mapping[:HEAD_LIMIT], actual)
                self._decode(row, memoryview(mapping)[len(head):], out, 0)
                return
            got = scratch.get(size)
            if os.preadv(fd, [got], 0) != size or not scratch.buf.startswith(head):
                self._diagnose(row, os.pread(fd, HEAD_LIMIT, 0), actual)
            self._decode(row, got[len(head):], out, 0)
        finally:
            os.close(fd)

    def map_into(self, row: ChunkRow, arena, offset: int, scratch: Scratch) -> None:
        """Map a verbatim, page-aligned payload into the arena at `offset` (copy-on-write), or copy it where
        mapping fails; the caller checks the hash afterwards (`check`)."""
        if row.raw_size > MAX_CHUNK_RAW:
            self._check_size(row, MAX_CHUNK_RAW)
        try:
            head = self.head(row)
            fd, actual = self._open(row)
            try:
                got = scratch.get(len(head))
                if actual != len(head) + row.raw_size or os.preadv(fd, [got], 0) != len(head) \
                        or not scratch.buf.startswith(head):
                    self._diagnose(row, os.pread(fd, HEAD_LIMIT, 0), actual)
                try:
                    arena.map_file(offset, row.raw_size, fd, len(head))
                except OSError:  # out of mappings (vm.max_map_count) or memory: copy instead
                    if os.preadv(fd, [arena.view[offset:offset + row.raw_size]], len(head)) != row.raw_size:
                        self._diagnose(row, os.pread(fd, HEAD_LIMIT, 0), actual)
            finally:
                os.close(fd)
        except (FormatError, OSError, MemoryError) as exc:
            raise _reported(exc, row) from None
