"""The streaming ring: one preallocated buffer through which streamed weights pass, a reader thread that
fills it ahead of the computation, and the order it fills it in.

A `Unit` is what one computation step needs at once: a weight, or a run of whole rows of one (a piece of
a large output layer), or all the arrays of a compressed weight (packed codes and their scales), described
by the catalogue rows of its chunks. The ring holds units first in,
first out: the reader thread places the next unit at the ring's head as soon as the oldest units have
been released, lands its chunks there (read, decoded, hash-checked by the store's chunk reader) and
marks it ready; the computation `acquire`s units in order, uses them as tensors that are views of the
ring, and `release`s each before the next. Nothing is allocated per unit or per token: the ring and
the reader's scratch are allocated once.

The order is learned, not assumed: the first pass over the model loads each unit on demand (in the
calling thread) and records the order; from the second pass, which starts with the first unit again,
the reader thread prefetches along that cycle. A pass that asks for another unit than the cycle says
(the model ran a different path) drops what was prefetched and learns again, so the answer never
depends on the order guessed.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass

import torch

from modelpress.errors import ConfigError
from modelpress.store import layout
from modelpress.store.reader import ChunkReader, Scratch
from modelpress.store.rows import ChunkRow

__all__ = ["Part", "Unit", "Ring"]


@dataclass(frozen=True)
class Part:
    """One array of a compressed weight landed with the others (its codes, scales, zero points)."""
    name: str  # the array's name in the encoding ("codes", "scale", "zero")
    dtype: str
    shape: tuple[int, ...]
    chunks: int  # how many of the unit's chunks, in order, hold it


@dataclass(frozen=True)
class Unit:
    """A tensor (or rows [first_row, first_row + shape[0]) of one) that is streamed as a whole; or, with
    `parts`, all the arrays of a compressed weight (`chunks` holds theirs in order, each array starting on an
    ALIGN boundary of the unit; `dtype` and `shape` are the first array's)."""
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    first_row: int
    chunks: tuple[ChunkRow, ...]
    parts: tuple[Part, ...] = ()

    @property
    def nbytes(self) -> int:
        if not self.parts:
            return layout.element_size(self.dtype) * math.prod(self.shape)
        return sum(layout.aligned(layout.element_size(p.dtype) * math.prod(p.shape)) for p in self.parts)

    @property
    def stored(self) -> int:
        return sum(row.stored_size for row in self.chunks)

    def offsets(self) -> list[int]:
        """Where each chunk lands, in bytes from the unit's start."""
        if not self.parts:
            return list(itertools.accumulate((row.raw_size for row in self.chunks[:-1]), initial=0))
        out, start, position = [], 0, 0
        for part in self.parts:
            offset = start
            for row in self.chunks[position:position + part.chunks]:
                out.append(offset)
                offset += row.raw_size
            position += part.chunks
            start += layout.aligned(layout.element_size(part.dtype) * math.prod(part.shape))
        return out

    def view(self, flat: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The unit's tensor in `flat` (its landed bytes, uint8), or its arrays by name for a compressed weight."""
        if not self.parts:
            return flat[:self.nbytes].view(layout.torch_dtype(self.dtype)).view(self.shape)
        out, start = {}, 0
        for part in self.parts:
            size = layout.element_size(part.dtype) * math.prod(part.shape)
            out[part.name] = flat[start:start + size].view(layout.torch_dtype(part.dtype)).view(part.shape)
            start += layout.aligned(size)
        return out


@dataclass
class _Entry:
    unit: int
    offset: int
    ready: bool = False
    error: BaseException | None = None


class Ring:
    """`capacity` bytes through which `units` are streamed (see the module docstring)."""

    def __init__(self, reader: ChunkReader, units: list[Unit], capacity: int, prefetch: bool = True,
                 readers: int = 1):
        largest = max((layout.aligned(u.nbytes) for u in units), default=0)
        if units and capacity < largest:
            raise ConfigError(f"a streaming ring of {capacity} bytes cannot hold a unit of {largest}: give more memory")
        self.reader, self.units, self.capacity, self.prefetch = reader, units, capacity, prefetch
        self.buffer = torch.empty(capacity, dtype=torch.uint8)  # (capacity,): every streamed weight lives here
        self._view = memoryview(self.buffer.numpy()) if capacity else memoryview(bytearray())
        self._entries: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._order: list[int] = []
        self._cycle: tuple[int, ...] | None = None
        self._threads: list[threading.Thread] = []
        self.readers = max(1, readers)  # threads landing units at once (each its own unit, placed in order)
        self._position = 0
        self._stop = False
        self._held: int | None = None
        self._scratch = Scratch()
        self.bytes_landed = 0  # raw bytes decoded into the ring, all threads
        self.stored_read = 0  # stored (payload) bytes read for them
        self.relearned = 0

    # -- the computation's side ----------------------------------------------------------------

    def acquire(self, index: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """Unit `index` as a tensor (a view of the ring; a compressed weight's arrays by name), loaded and
        checked; release it before the next."""
        if self._held is not None:
            raise ConfigError("a streamed unit is still held: release it before acquiring the next")
        with self._cond:
            if self._cycle is not None:
                while not self._entries or not (self._entries[0].ready or self._entries[0].error):
                    self._cond.wait()
                entry = self._entries[0]
                if entry.error is not None:
                    raise entry.error
                if entry.unit != index:  # the model took another path: learn again from here
                    self._relearn_locked()
        if self._cycle is None:
            entry = self._learn(index)
        self._held = index
        unit = self.units[index]
        return unit.view(self.buffer[entry.offset:entry.offset + unit.nbytes])

    def release(self, index: int) -> None:
        if self._held != index:
            raise ConfigError(f"unit {index} is not the one held")
        self._held = None
        with self._cond:
            self._entries.popleft()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []

    # -- learning the order ----------------------------------------------------------------------

    def _learn(self, index: int) -> _Entry:
        """Load `index` here and now; the second time the first unit is asked for, the cycle is known."""
        if self.prefetch and self._order and index == self._order[0]:
            with self._cond:
                self._cycle, self._stop, self._position = tuple(self._order), False, 0
                self._threads = [threading.Thread(target=self._fill, daemon=True, name=f"modelpress-ring-{i}")
                                 for i in range(self.readers)]
                for thread in self._threads:
                    thread.start()
            return self._wait_front(index)
        self._order.append(index)
        entry = _Entry(index, 0)
        self._entries.append(entry)
        self._land(entry, self._scratch)
        if entry.error is not None:
            self._entries.clear()
            raise entry.error
        return entry

    def _wait_front(self, index: int) -> _Entry:
        with self._cond:
            while not self._entries or not (self._entries[0].ready or self._entries[0].error):
                self._cond.wait()
            entry = self._entries[0]
            if entry.error is not None:
                raise entry.error
            return entry

    def _relearn_locked(self) -> None:
        self._stop = True
        self._cond.notify_all()
        threads, self._threads = self._threads, []
        self._cond.release()
        try:
            for thread in threads:
                thread.join()
        finally:
            self._cond.acquire()
        self._entries.clear()
        self._cycle, self._order, self._stop = None, [], False
        self.relearned += 1

    # -- the reader thread -----------------------------------------------------------------------

    def _place(self, size: int) -> int | None:
        """Where a unit of `size` bytes fits after the units held now, or None until some are released."""
        if not self._entries:
            return 0
        tail = self._entries[0].offset
        last = self._entries[-1]
        head = last.offset + layout.aligned(self.units[last.unit].nbytes)
        if head > tail:  # not wrapped: room after the head, else from the start up to the tail
            if head + size <= self.capacity:
                return head
            return 0 if size <= tail else None
        return head if head + size <= tail else None

    def _fill(self) -> None:
        """A reader thread: place the cycle's next unit as soon as it fits (in order, under the lock), then land
        it outside the lock, so that several readers land consecutive units at once."""
        cycle, scratch = self._cycle, Scratch()
        while True:
            with self._cond:
                while not self._stop:
                    index = cycle[self._position % len(cycle)]
                    offset = self._place(layout.aligned(self.units[index].nbytes))
                    if offset is not None:
                        break
                    self._cond.wait()
                if self._stop:
                    return
                self._position += 1
                entry = _Entry(index, offset)
                self._entries.append(entry)
            self._land(entry, scratch)
            with self._cond:
                self._cond.notify_all()
            if entry.error is not None:
                return

    def _land(self, entry: _Entry, scratch: Scratch) -> None:
        unit = self.units[entry.unit]
        try:
            for row, offset in zip(unit.chunks, unit.offsets()):
                position = entry.offset + offset
                self.reader.land(row, self._view[position:position + row.raw_size], scratch)
            with self._cond:
                self.bytes_landed += unit.nbytes
                self.stored_read += unit.stored
            entry.ready = True
        except BaseException as exc:  # handed to the computation, which raises it
            entry.error = exc
