"""Loading tensors from chunks: one arena planned up front, then worker threads read, decode or map
every chunk into it, each chunk hashed as it lands (bytes that do not hash to the chunk's id are
refused).

Per chunk the work is a few system calls and one codec call, which all release the GIL, so the
threads keep their cores busy: open, fstat, a read-only mapping of the file (small files: one
preadv into a per-thread scratch buffer; raw chunks: a preadv of the payload straight into the
arena), close; decode into the arena; BLAKE3 of the decoded bytes (for `aligned` chunks the XXH3-128
their header carries, ten times cheaper: see objects.aligned_params). A tensor whose chunks are all
`aligned`, page multiples but the last, is mapped from the page cache instead (copy-on-write, no
copy; its pages fault in as the hash reads them). The file's head is compared with the bytes the
catalogue row implies, so the header checks (canonical, agreeing with the catalogue, zero padding)
cost one comparison; only a mismatch is parsed, to say what is wrong.

Mapping instead of reading saves a copy of every compressed byte (measured: a third of the CPU
time of read + decode). Like any reader of mapped files, a load faults (SIGBUS) if a chunk file is
truncated while it is being read; chunk files are immutable and no modelpress operation truncates
one (`gc` unlinks, which leaves mappings intact).
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import blake3
import torch
import xxhash

from modelpress.errors import FormatError
from modelpress.store import layout
from modelpress.store.arena import PAGE, Arena, can_map
from modelpress.store.catalog import TensorRecord
from modelpress.store.codecs import codec_for
from modelpress.store.objects import (
    ALIGNED,
    HEAD_LIMIT,
    MAX_CHUNK_RAW,
    ChunkHeader,
    CorruptChunkError,
    alignment,
    reported_as_corrupt,
)

__all__ = ["Job", "Plan", "plan", "run"]

_O_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block us
_MAP_MIN = 64 << 10  # files at least this big are mapped to be decoded; smaller ones are read (cheaper)
_MAP_FLAGS = getattr(mmap, "MAP_SHARED", 0) | getattr(mmap, "MAP_POPULATE", 0)
Row = tuple[str, dict[str, Any], int, int, "str | None"]  # (codec, params, raw_size, stored_size, base)


class Job(NamedTuple):
    """One chunk to land at arena bytes [offset, offset + raw_size)."""
    cid: str
    codec: str
    params: dict[str, Any]
    raw_size: int
    stored_size: int
    base: str | None
    offset: int
    mapped: bool


@dataclass(frozen=True)
class Plan:
    size: int  # arena bytes
    written: int  # arena bytes [0, written) are decoded or copied into; mapped tensors follow
    tensors: list[tuple[TensorRecord, int, int]]  # (record, offset, nbytes), in the records' order
    jobs: list[Job]


def _mappable(rows: list[Row]) -> bool:
    """Whether a tensor's chunks can be mapped one after another: all `aligned` on a page multiple, and page
    multiples in size but the last."""
    try:
        return can_map() and all(
            codec == ALIGNED and base is None and alignment(params) % PAGE == 0
            and (i == len(rows) - 1 or size % PAGE == 0) for i, (codec, params, size, _, base) in enumerate(rows))
    except FormatError:
        return False  # bad parameters: the copy path reports them, naming the chunk


def _check_row(cid: str, row: Row) -> None:
    codec, _, raw_size, stored_size, _ = row
    if raw_size > MAX_CHUNK_RAW:
        raise CorruptChunkError(f"chunk {cid[:12]} claims {raw_size} bytes; the catalogue is corrupt")
    expected = raw_size if codec in ("raw", ALIGNED) else None
    if (expected is not None and stored_size != expected) or stored_size > raw_size + raw_size // 8 + 65536:
        raise CorruptChunkError(f"chunk {cid[:12]}'s catalogue row gives an impossible stored size; "
                                "run `modelpress store verify`")


def plan(records: list[TensorRecord], rows: dict[str, Row]) -> Plan:
    """Where each tensor and chunk goes; everything checked before any memory is allocated."""
    placed = []
    for record in records:
        nbytes = layout.element_size(record.dtype) * math.prod(record.shape)
        chunk_rows = [rows[cid] for cid in record.chunks]
        if sum(row[2] for row in chunk_rows) != nbytes:
            raise FormatError(f"tensor {record.name!r}: chunks hold {sum(row[2] for row in chunk_rows)} bytes, its "
                              f"shape needs {nbytes}; the store is corrupt")
        for cid, row in zip(record.chunks, chunk_rows):
            _check_row(cid, row)
        placed.append((record, nbytes, chunk_rows, bool(chunk_rows) and _mappable(chunk_rows)))
    offset, where, jobs = 0, {}, []
    for want_mapped in (False, True):  # copied tensors first, so that one call can populate them all
        if want_mapped:
            written = offset
            if any(p[3] for p in placed):
                offset = -(-offset // PAGE) * PAGE
        for record, nbytes, chunk_rows, mapped in placed:
            if mapped != want_mapped:
                continue
            where[record.name] = offset
            pos = offset
            for cid, (codec, params, raw_size, stored_size, base) in zip(record.chunks, chunk_rows):
                jobs.append(Job(cid, codec, params, raw_size, stored_size, base, pos, mapped))
                pos += raw_size
            offset += -(-nbytes // PAGE) * PAGE if mapped else layout.aligned(nbytes)
    return Plan(offset, written, [(record, where[record.name], nbytes) for record, nbytes, _, _ in placed], jobs)


def run(root: Path, plan_: Plan, threads: int, fallback: Callable[..., None]) -> dict[str, torch.Tensor]:
    """Allocate the arena, land every chunk (largest first, `threads` threads, the caller's included) and
    return the tensors as views of it. `fallback(cid, out, codec, params, base, 0, stored_size)` lands
    delta chunks (their bases are decoded first)."""
    try:
        arena = Arena(plan_.size, plan_.written)
    except (OSError, ValueError, OverflowError) as exc:  # mmap reports a failed allocation as ENOMEM
        raise MemoryError(str(exc)) from None
    folder, heads = os.fspath(root / "chunks"), {}
    # Map every aligned chunk from this thread first, then hash and decode on all threads. Mapping
    # while another thread of the process faults pages in makes both wait on the process's memory
    # map and (in a VM) flush each other's TLBs: measured 7x slower on two threads than one.
    scratch = _Scratch()
    for job in plan_.jobs:
        if job.mapped:
            _land(folder, job, arena, scratch, fallback, heads, check=False)
    order = iter(sorted(plan_.jobs, key=lambda j: -j.raw_size))  # a list iterator: next() is atomic
    failures: list[BaseException] = []

    def work() -> None:
        scratch = _Scratch()
        for job in order:
            if failures:
                return
            try:
                if job.mapped:
                    _check(job, arena.view[job.offset:job.offset + job.raw_size])
                else:
                    _land(folder, job, arena, scratch, fallback, heads)
            except BaseException as exc:  # handed to the caller's thread, which raises it
                failures.append(exc)
                return

    helpers = [threading.Thread(target=work, daemon=True) for _ in range(min(threads, len(plan_.jobs)) - 1)]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if failures:
        raise failures[0]
    out = {}
    for record, offset, nbytes in plan_.tensors:
        flat = arena.tensor[offset:offset + nbytes].view(layout.torch_dtype(record.dtype))
        out[record.name] = flat.reshape(record.shape)
    return out


class _Scratch:
    """A thread's read buffer, grown as needed and reused: no fresh pages per chunk."""

    def __init__(self):
        self.buf = bytearray()

    def get(self, n: int) -> memoryview:
        if len(self.buf) < n:
            self.buf = bytearray(max(n, 2 * len(self.buf)))
        return memoryview(self.buf)[:n]


def _land(folder: str, job: Job, arena: Arena, scratch: _Scratch, fallback: Callable[..., None],
          heads: dict, check: bool = True) -> None:
    """Read, decode or map one chunk into the arena and (unless `check` is False) check its hash."""
    where = f"chunk {job.cid[:12]}"
    out = arena.view[job.offset:job.offset + job.raw_size]
    if job.base is not None:
        fallback(job.cid, out, job.codec, job.params, job.base, 0, job.stored_size)
        return
    with reported_as_corrupt(where):
        _read(folder, job, arena, scratch, out, where, heads)
    if check:
        _check(job, out)


def _check(job: Job, out: memoryview) -> None:
    """Refuse a landed chunk whose bytes do not hash to what its catalogue row says."""
    if job.codec == ALIGNED:  # the fast check the chunk's header carries (objects.aligned_params says why)
        intact = xxhash.xxh3_128_hexdigest(out) == job.params["xxh3_128"]
    else:
        intact = blake3.blake3(out, max_threads=1).hexdigest() == job.cid
    if not intact:
        raise CorruptChunkError(f"chunk {job.cid[:12]} does not match its hash (corrupt); "
                                "run `modelpress store verify`")


def _head(job: Job, heads: dict) -> bytes:
    """The bytes a chunk file must start with, given its catalogue row (memoised: rows share their params dicts,
    see Catalog.chunks, and most share a size)."""
    key = (job.codec, id(job.params), job.raw_size)
    if key not in heads:
        heads[key] = ChunkHeader(job.codec, job.params, job.raw_size, None).head()
    return heads[key]


def _read(folder: str, job: Job, arena: Arena, scratch: _Scratch, out: memoryview, where: str, heads: dict) -> None:
    head = _head(job, heads)
    size = len(head) + job.stored_size
    try:  # (the id was checked against ID_PATTERN when the catalogue row was read: no path tricks)
        fd = os.open(f"{folder}/{job.cid[:2]}/{job.cid}", _O_FLAGS)
    except FileNotFoundError:
        raise FormatError(f"{where} is missing from the store; run `modelpress store verify`") from None
    except OSError as exc:
        raise FormatError(f"{where} cannot be read ({exc.strerror}); run `modelpress store verify`") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{where} is not a regular file; run `modelpress store verify`")
        if info.st_size != size:
            _diagnose(fd, job, where)
        raw = job.codec in ("raw", ALIGNED)
        if not raw and size >= _MAP_MIN and hasattr(mmap, "PROT_READ"):
            _decode_mapped(fd, job, head, size, out, where)
            return
        got = scratch.get(len(head) if raw else size)
        buffers = [got] if job.mapped or not raw else [got, out]
        if os.preadv(fd, buffers, 0) != (len(head) if job.mapped else size) or not scratch.buf.startswith(head):
            _diagnose(fd, job, where)
        if job.mapped:
            try:
                arena.map_file(job.offset, job.raw_size, fd, len(head))
            except OSError:  # out of mappings (vm.max_map_count) or memory: copy instead
                if os.preadv(fd, [out], len(head)) != len(out):
                    _diagnose(fd, job, where)
        elif not raw:
            codec_for(job.codec).decode_into(got[len(head):], out, job.params)
    except OSError as exc:
        raise FormatError(f"{where} cannot be read ({exc.strerror}); run `modelpress store verify`") from None
    finally:
        os.close(fd)


def _decode_mapped(fd: int, job: Job, head: bytes, size: int, out: memoryview, where: str) -> None:
    """Decode a compressed chunk straight from the page cache. The mapping is left to the garbage collector
    rather than closed: a view of it may live on in an exception's traceback."""
    mapping = mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
    if mapping[:len(head)] != head:
        _diagnose(fd, job, where)
    codec_for(job.codec).decode_into(memoryview(mapping)[len(head):], out, job.params)


def _diagnose(fd: int, job: Job, where: str) -> None:
    """Say what is wrong with a chunk file whose head or size is not what its catalogue row implies."""
    header, offset = ChunkHeader.parse(memoryview(os.pread(fd, HEAD_LIMIT, 0)), where)
    if (header.codec, header.params, header.raw_size, header.base) != (job.codec, job.params, job.raw_size, job.base):
        raise CorruptChunkError(f"{where}'s header disagrees with the catalogue; run `modelpress store verify`")
    payload = os.fstat(fd).st_size - offset
    raise CorruptChunkError(f"{where} has {payload} payload bytes, the catalogue says {job.stored_size}; "
                            "run `modelpress store verify`")
