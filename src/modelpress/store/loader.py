"""Loading tensors from chunks: one arena planned up front, then worker threads land every chunk into it
through the chunk reader (reader.py), each chunk checked against its hash as it lands.

A tensor whose chunks are all `aligned` on page boundaries (and page multiples in size but the last)
is mapped from the page cache instead of copied (copy-on-write, no copy; its pages fault in as the
hash check reads them). The arena is checked against the memory available before it is allocated
(a hostile catalogue can declare any shape), so a load that cannot fit is a LimitExceededError.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from modelpress import limits
from modelpress.errors import CorruptChunkError, FormatError, LimitExceededError
from modelpress.store import layout
from modelpress.store.arena import PAGE, Arena, can_map
from modelpress.store.objects import MAX_CHUNK_RAW, stored_bound
from modelpress.store.reader import ChunkReader, Scratch
from modelpress.store.rows import ChunkRow, TensorRecord

__all__ = ["Job", "Plan", "plan", "run"]

_ABSURD = 1 << 48  # no arena is ever this large, whatever memory says (mapped tensors are not counted there)


class Job(NamedTuple):
    """One chunk to land at arena bytes [offset, offset + row.raw_size)."""
    row: ChunkRow
    offset: int
    mapped: bool


@dataclass(frozen=True)
class Plan:
    size: int  # arena bytes
    written: int  # arena bytes [0, written) are decoded or copied into; mapped tensors follow
    tensors: list[tuple[TensorRecord, int, int]]  # (record, offset, nbytes), in the records' order
    jobs: list[Job]


def _mappable(rows: list[ChunkRow], backend_maps: bool) -> bool:
    """Whether a tensor's chunks can be mapped one after another: all verbatim and page-aligned in their files,
    and page multiples in size but the last."""
    return backend_maps and can_map() and all(
        row.codec.verbatim and row.codec.alignment % PAGE == 0 and (i == len(rows) - 1 or row.raw_size % PAGE == 0)
        for i, row in enumerate(rows))


def _check_row(row: ChunkRow) -> None:
    if row.raw_size > MAX_CHUNK_RAW:
        raise LimitExceededError(f"chunk {row.id[:12]} claims {row.raw_size} bytes, more than the {MAX_CHUNK_RAW} a "
                                 "chunk can hold; the catalogue is corrupt: run `modelpress store verify`")
    if (row.codec.verbatim and row.stored_size != row.raw_size) or row.stored_size > stored_bound(row.raw_size):
        raise CorruptChunkError(f"chunk {row.id[:12]}'s catalogue row gives an impossible stored size; "
                                "run `modelpress store verify`")


def plan(records: list[TensorRecord], rows: dict[str, ChunkRow], backend_maps: bool = True) -> Plan:
    """Where each tensor and chunk goes; everything checked before any memory is allocated."""
    placed = []
    for record in records:
        nbytes = layout.element_size(record.dtype) * math.prod(record.shape)
        chunk_rows = [rows[cid] for cid in record.chunks]
        held = sum(row.raw_size for row in chunk_rows)
        if held != nbytes:
            raise FormatError(f"tensor {record.name!r}: chunks hold {held} bytes, its shape needs {nbytes}; "
                              "the store is corrupt")
        for row in chunk_rows:
            _check_row(row)
        placed.append((record, nbytes, chunk_rows, bool(chunk_rows) and _mappable(chunk_rows, backend_maps)))
    offset, where, jobs, written = 0, {}, [], 0
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
            for row in chunk_rows:
                jobs.append(Job(row, pos, mapped))
                pos += row.raw_size
            offset += -(-nbytes // PAGE) * PAGE if mapped else layout.aligned(nbytes)
    return Plan(offset, written, [(record, where[record.name], nbytes) for record, nbytes, _, _ in placed], jobs)


def run(reader: ChunkReader, plan_: Plan, threads: int) -> dict[str, torch.Tensor]:
    """Allocate the arena, land every chunk (largest first, `threads` threads, the caller's included) and
    return the tensors as views of it."""
    if plan_.size > _ABSURD:
        raise LimitExceededError(f"loading these tensors would take {plan_.size} bytes; the catalogue is corrupt")
    limits.check_allocation(plan_.written, f"loading {len(plan_.tensors)} tensors",
                            "ask for fewer tensors (names=...) or open() the version lazily")
    try:
        arena = Arena(plan_.size, plan_.written)
    except (OSError, ValueError, OverflowError, MemoryError) as exc:  # mmap reports a failed allocation as ENOMEM
        raise LimitExceededError(f"cannot allocate {plan_.size / 1e9:.2f} GB to load these tensors ({exc}): ask for "
                                 "fewer tensors (names=...) or open() the version lazily") from None
    # Map every aligned chunk from this thread first, then hash and decode on all threads. Mapping
    # while another thread of the process faults pages in makes both wait on the process's memory
    # map and (in a VM) flush each other's TLBs: measured 7x slower on two threads than one.
    scratch = Scratch()
    for job in plan_.jobs:
        if job.mapped:
            reader.map_into(job.row, arena, job.offset, scratch)
    order = iter(sorted(plan_.jobs, key=lambda j: -j.row.raw_size))  # a list iterator: next() is atomic
    failures: list[BaseException] = []

    def work() -> None:
        scratch = Scratch()
        for job in order:
            if failures:
                return
            out = arena.view[job.offset:job.offset + job.row.raw_size]
            try:
                if job.mapped:
                    reader.check(job.row, out)
                else:
                    reader.land(job.row, out, scratch)
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
