"""The placement plan: for each stored tensor of a version, where it lives while the model runs under a
memory budget, and what that costs.

Regions:

- `compute`: resident, decoded (a float weight in the arena, run by the dense matmul);
- `storage`: resident in its compressed encoding (quantised codes and scales, sparse values, ...), run by
  our kernels on the packed form or decoded per call as the module's kernel says (nn/kernels.py);
- `streamed`: read from the store through the streaming ring on every use (ring.py), whole or in
  pieces of whole rows of at most `piece_bytes`;
- `gathered`: a lookup table left in the store; a lookup reads only the row blocks it needs.

Everything that is not the weight of a Linear or Embedding stays resident (norms, biases, position tables
under one piece). A compressed weight can move out of memory when its modules can run it from where it
lands (streaming.py says which: quantised codes the packed-code kernel runs, or a table quantised by rows):
a Linear's codes and scales stream as one unit when they fit in one piece; larger codes (a tied output
layer) stream in pieces of whole rows, and a table's codes are gathered by rows, with their scales (and
zero points) resident. Other encodings stay resident in storage form. Of the rest, the plan keeps resident what the
budget holds after the ring (twice the largest streamed unit, so that the next unit lands while the
current one computes) and the gather buffer, taking first the weights that would be read whole on every
pass (Linear weights, tied output layers), then lookup-only tables (a lookup reads a few row blocks).
Leftover budget widens the ring (more prefetch). The weight memory a run holds is `weight_bytes`:
resident tensors, the ring and the gather buffers; it never exceeds the budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from modelpress.errors import ConfigError
from modelpress.formats.checkpoint import PART_SEPARATOR
from modelpress.store import layout
from modelpress.store.rows import ChunkRow, TensorRecord

from modelpress.regions.modules import GatherEmbedding
from modelpress.regions.ring import Part, Unit

__all__ = ["Region", "Placement", "PlacementPlan", "place", "parse_memory", "PIECE_BYTES", "tensor_uses"]

PIECE_BYTES = 4 << 20  # a streamed weight larger than this is cut into pieces of whole chunks up to this size
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_memory(text: str | int) -> int:
    """Bytes from '64MB', '1.5GB', '512MiB' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"memory {text!r} is not a size: write e.g. 64MB, 1.5GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


class Region(str, Enum):
    COMPUTE = "compute"
    STORAGE = "storage"
    STREAMED = "streamed"
    GATHERED = "gathered"


@dataclass(frozen=True)
class Placement:
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    region: Region
    nbytes: int  # raw bytes of the tensor
    stored: int  # its chunks' stored bytes
    uses: tuple[str, ...]  # "linear", "embedding", or () for anything else
    units: tuple[int, ...] = ()  # indices into the plan's units (streamed tensors)
    logical: tuple[int, ...] | None = None  # a compressed weight's codes: the shape of the weight they encode


@dataclass(frozen=True)
class PlacementPlan:
    budget: int
    placements: tuple[Placement, ...]
    units: tuple[Unit, ...]
    ring_bytes: int
    gather_bytes: int
    codecs: dict[str, int] = field(default_factory=dict)  # stored bytes streamed per pass, by codec
    reserve: int = 0  # bytes of the budget left to the run's working memory (KV cache, activations, objects)

    def resident(self) -> int:
        return sum(layout.aligned(p.nbytes) for p in self.placements if p.region in (Region.COMPUTE, Region.STORAGE))

    def weight_bytes(self) -> int:
        """Weight memory a run holds: resident tensors, the streaming ring and the gather buffers (at most the
        budget less the reserve)."""
        return self.resident() + self.ring_bytes + self.gather_bytes

    def streamed_per_pass(self) -> int:
        """Raw bytes streamed through the ring per forward pass."""
        return sum(u.nbytes for u in self.units)

    def region_bytes(self) -> dict[str, int]:
        out = dict.fromkeys((r.value for r in Region), 0)
        for p in self.placements:
            out[p.region.value] += p.nbytes
        return out

    def placement(self, tensor: str) -> Placement:
        for p in self.placements:
            if p.tensor == tensor:
                return p
        raise KeyError(tensor)


def tensor_uses(skeleton: nn.Module, tied: dict[str, str]) -> dict[str, set[str]]:
    """Per state-dict name, how the model uses it: as a dense Linear's or Embedding's weight (tied names
    count for the tensor they are stored as)."""
    uses: dict[str, set[str]] = {}
    for name, module in skeleton.named_modules():
        key = f"{name}.weight" if name else "weight"
        if type(module) is nn.Linear:
            uses.setdefault(tied.get(key, key), set()).add("linear")
        elif type(module) is nn.Embedding and module.max_norm is None and not module.sparse:
            uses.setdefault(tied.get(key, key), set()).add("embedding")
    return uses


def _pieces(record: TensorRecord, rows: list[ChunkRow], piece_bytes: int) -> list[Unit]:
    """A weight's chunks grouped into units of whole chunks, each at most `piece_bytes` (or one chunk)."""
    row_bytes = layout.element_size(record.dtype) * record.shape[1]
    units, group, size, first = [], [], 0, 0
    for row in rows + [None]:
        if group and (row is None or size + row.raw_size > piece_bytes):
            count = size // row_bytes
            units.append(Unit(record.name, record.dtype, (count, record.shape[1]), first, tuple(group)))
            first, group, size = first + count, [], 0
        if row is not None:
            group.append(row)
            size += row.raw_size
    if len(units) == 1:  # the whole weight: exactly the resident layer's shape
        units = [Unit(record.name, record.dtype, tuple(record.shape), 0, units[0].chunks)]
    return units


@dataclass
class _Candidate:
    """A weight the plan may move out of memory: a float tensor (one record) or a compressed weight's arrays
    (codes first). `movable`: the bytes freed by streaming it; `pinned`: what stays resident even then (the
    scales of codes streamed in pieces or gathered by rows)."""
    use: set[str]
    records: list[TensorRecord]
    movable: int
    pinned: int
    units: list[Unit]  # streamed through the ring when used by a Linear
    gather_rows: list[ChunkRow]  # read by rows when used by an Embedding
    composite: bool = False  # one unit holds all the arrays

    @property
    def gather_bytes(self) -> int:
        return 2 * max((row.raw_size for row in self.gather_rows), default=0)  # a buffer + a read scratch


def _candidates(records: list[TensorRecord], rows: dict[str, ChunkRow], uses: dict[str, set[str]],
                quantised: dict[str, tuple[int, ...]], piece_bytes: int) -> list[_Candidate]:
    by_name = {r.name: r for r in records}
    out = []
    for record in records:
        chunk_rows = [rows[c] for c in record.chunks]
        itemsize = layout.element_size(record.dtype)
        aligned_rows = GatherEmbedding.row_aligned(record.shape, itemsize, chunk_rows)
        if record.name.endswith(PART_SEPARATOR + "codes"):
            weight = record.name[:-len(PART_SEPARATOR + "codes")]
            use = uses.get(weight, set())
            if weight not in quantised or not use or not chunk_rows or not aligned_rows or record.dtype != "uint8":
                continue
            extra = [by_name[f"{weight}{PART_SEPARATOR}{part}"] for part in ("scale", "zero")
                     if f"{weight}{PART_SEPARATOR}{part}" in by_name]
            sizes = [layout.aligned(_nbytes(r)) for r in (record, *extra)]
            if use == {"linear"} and sum(sizes) <= piece_bytes:  # codes and scales land together
                chunks = tuple(rows[c] for r in (record, *extra) for c in r.chunks)
                parts = tuple(Part(r.name.split(PART_SEPARATOR)[1], r.dtype, tuple(r.shape), len(r.chunks))
                              for r in (record, *extra))
                unit = Unit(weight, record.dtype, tuple(record.shape), 0, chunks, parts)
                out.append(_Candidate(use, [record, *extra], sum(sizes), 0, [unit], [], composite=True))
                continue
            units = _pieces(record, chunk_rows, piece_bytes) if "linear" in use else []
            out.append(_Candidate(use, [record, *extra], sizes[0], sum(sizes[1:]), units,
                                  chunk_rows if "embedding" in use else []))
            continue
        use = uses.get(record.name, set())
        if (use and PART_SEPARATOR not in record.name and record.dtype in layout.FLOAT_NAMES
                and len(record.shape) == 2 and chunk_rows and aligned_rows):
            units = _pieces(record, chunk_rows, piece_bytes) if "linear" in use else []
            out.append(_Candidate(use, [record], layout.aligned(_nbytes(record)), 0, units,
                                  chunk_rows if "embedding" in use else []))
    return out


def _nbytes(record: TensorRecord) -> int:
    return layout.element_size(record.dtype) * math.prod(record.shape)


def place(records: list[TensorRecord], rows: dict[str, ChunkRow], uses: dict[str, set[str]], budget: int,
          piece_bytes: int = PIECE_BYTES, quantised: dict[str, tuple[int, ...]] | None = None) -> PlacementPlan:
    """The placement of `records` under `budget` bytes of weight memory (see the module docstring).

    `quantised`: the compressed weights ("<module>.weight" -> the weight's shape) whose modules can run
    streamed (quantised codes the packed kernel or a row gather reads; see streaming.py)."""
    if piece_bytes <= 0:
        raise ConfigError("piece_bytes must be positive")
    quantised = quantised or {}
    candidates = _candidates(records, rows, uses, quantised, piece_bytes)
    claimed = {r.name for c in candidates for r in c.records}
    base = sum(layout.aligned(_nbytes(r)) for r in records if r.name not in claimed)
    if base + sum(c.movable + c.pinned for c in candidates) <= budget:  # everything fits: a plain resident load
        return _build(budget, records, rows, uses, quantised, [], 0, 0)
    base += sum(c.pinned for c in candidates)
    largest = max((layout.aligned(u.nbytes) for c in candidates for u in c.units), default=0)
    ring_min = 2 * largest
    gather_min = sum(c.gather_bytes for c in candidates)
    room = budget - base - ring_min - gather_min
    if room < 0:
        raise ConfigError(f"a memory budget of {budget} bytes cannot run this model: its resident tensors, streaming "
                          f"ring and gather buffers need at least {budget - room} bytes; give more --memory")
    order = sorted(range(len(candidates)), key=lambda i: "linear" not in candidates[i].use)  # stable: model order
    keep = set()
    for i in order:
        if candidates[i].movable <= room:
            keep.add(i)
            room -= candidates[i].movable
    moved = [c for i, c in enumerate(candidates) if i not in keep]
    gather = sum(c.gather_bytes for c in moved)
    total_units = sum(layout.aligned(u.nbytes) for c in moved for u in c.units)
    kept = sum(candidates[i].movable for i in keep)
    ring = min(budget - base - kept - gather, max(total_units, ring_min)) if total_units else 0
    return _build(budget, records, rows, uses, quantised, moved, ring, gather)


def _build(budget: int, records: list[TensorRecord], rows: dict[str, ChunkRow], uses: dict[str, set[str]],
           quantised: dict[str, tuple[int, ...]], moved: list[_Candidate], ring: int, gather: int) -> PlacementPlan:
    streamed: dict[str, list[Unit]] = {}  # the record whose units they are -> its units
    owner: dict[str, str] = {}  # every record streamed -> the record its units are listed under
    gathered: set[str] = set()
    for c in moved:
        first = c.records[0].name
        if c.units:
            streamed[first] = c.units
            for r in c.records[:len(c.records) if c.composite else 1]:
                owner[r.name] = first
        elif c.gather_rows:
            gathered.add(first)
    placements, units, codecs, indices_of = [], [], {}, {}
    for record in records:
        if record.name in streamed:
            indices_of[record.name] = tuple(range(len(units), len(units) + len(streamed[record.name])))
            units.extend(streamed[record.name])
    for record in records:
        chunk_rows = [rows[c] for c in record.chunks]
        weight = record.name.split(PART_SEPARATOR)[0]
        use = tuple(sorted(uses.get(weight, ())))
        stored = sum(row.stored_size for row in chunk_rows)
        indices: tuple[int, ...] = ()
        if record.name in owner:
            region = Region.STREAMED
            indices = indices_of[owner[record.name]]
            for row in chunk_rows:
                codecs[row.codec.name] = codecs.get(row.codec.name, 0) + row.stored_size
        elif record.name in gathered:
            region = Region.GATHERED
        else:
            region = Region.STORAGE if PART_SEPARATOR in record.name else Region.COMPUTE
        logical = quantised.get(weight) if record.name.endswith(PART_SEPARATOR + "codes") else None
        placements.append(Placement(record.name, record.dtype, tuple(record.shape), region, _nbytes(record), stored,
                                    use, indices, logical))
    return PlacementPlan(budget, tuple(placements), tuple(units), ring, gather, codecs)
