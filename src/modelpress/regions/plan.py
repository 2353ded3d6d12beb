"""The placement plan: for each stored tensor of a version, where it lives while the model runs under a
memory budget, and what that costs.

Regions:

- `compute`: resident, decoded (a float weight in the arena, run by the dense matmul);
- `storage`: resident in its compressed encoding (quantised codes and scales, sparse values, ...), run by
  our kernels on the packed form or decoded per call as the module's kernel says (nn/kernels.py);
- `streamed`: read from the store through the streaming ring on every use (ring.py), whole or in
  pieces of whole rows of at most `piece_bytes`;
- `gathered`: a lookup table left in the store; a lookup reads only the row blocks it needs.

Everything that is not a dense weight of an `nn.Linear` or `nn.Embedding` stays resident (norms, biases,
position tables under one piece, compressed encodings). Of the rest, the plan keeps resident what the
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
from modelpress.regions.ring import Unit

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


@dataclass(frozen=True)
class PlacementPlan:
    budget: int
    placements: tuple[Placement, ...]
    units: tuple[Unit, ...]
    ring_bytes: int
    gather_bytes: int
    codecs: dict[str, int] = field(default_factory=dict)  # stored bytes streamed per pass, by codec

    def resident(self) -> int:
        return sum(layout.aligned(p.nbytes) for p in self.placements if p.region in (Region.COMPUTE, Region.STORAGE))

    def weight_bytes(self) -> int:
        """Weight memory a run holds: resident tensors, the streaming ring and the gather buffers."""
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


def place(records: list[TensorRecord], rows: dict[str, ChunkRow], uses: dict[str, set[str]], budget: int,
          piece_bytes: int = PIECE_BYTES) -> PlacementPlan:
    """The placement of `records` under `budget` bytes of weight memory (see the module docstring)."""
    if piece_bytes <= 0:
        raise ConfigError("piece_bytes must be positive")
    mandatory, candidates = [], []
    for record in records:
        chunk_rows = [rows[c] for c in record.chunks]
        use = uses.get(record.name, set())
        itemsize = layout.element_size(record.dtype)
        streamable = (use and PART_SEPARATOR not in record.name and record.dtype in layout.FLOAT_NAMES
                      and len(record.shape) == 2 and chunk_rows
                      and GatherEmbedding.row_aligned(record.shape, itemsize, chunk_rows))
        (candidates if streamable else mandatory).append((record, chunk_rows, use))
    need = [layout.aligned(layout.element_size(r.dtype) * math.prod(r.shape)) for r, _, _ in mandatory]
    base = sum(need)
    cand_bytes = [layout.aligned(layout.element_size(r.dtype) * math.prod(r.shape)) for r, _, _ in candidates]
    if base + sum(cand_bytes) <= budget:  # everything fits: a plain resident load
        return _build(budget, records, rows, uses, {}, set(), 0, 0)
    linear_units = {r.name: _pieces(r, cr, piece_bytes) for r, cr, u in candidates if "linear" in u}
    largest = max((layout.aligned(u.nbytes) for us in linear_units.values() for u in us), default=0)
    ring_min = 2 * largest
    gather_min = sum(2 * max(row.raw_size for row in cr) for r, cr, u in candidates if "embedding" in u)
    room = budget - base - ring_min - gather_min
    if room < 0:
        raise ConfigError(f"a memory budget of {budget} bytes cannot run this model: its resident tensors, streaming "
                          f"ring and gather buffers need at least {budget - room} bytes; give more --memory")
    order = sorted(range(len(candidates)), key=lambda i: "linear" not in candidates[i][2])  # stable: model order
    keep = set()
    for i in order:
        if cand_bytes[i] <= room:
            keep.add(candidates[i][0].name)
            room -= cand_bytes[i]
    streamed = {r.name: linear_units[r.name] for r, _, u in candidates if r.name not in keep and "linear" in u}
    gathered = {r.name: cr for r, cr, u in candidates if r.name not in keep and "embedding" in u}
    gather = sum(2 * max(row.raw_size for row in cr) for cr in gathered.values())  # a buffer + a read scratch each
    total_units = sum(layout.aligned(u.nbytes) for us in streamed.values() for u in us)
    ring = min(budget - base - sum(cand_bytes[i] for i in range(len(candidates)) if candidates[i][0].name in keep)
               - gather, max(total_units, ring_min if streamed else 0)) if streamed else 0
    return _build(budget, records, rows, uses, streamed, set(gathered), ring, gather)


def _build(budget: int, records: list[TensorRecord], rows: dict[str, ChunkRow], uses: dict[str, set[str]],
           streamed: dict[str, list[Unit]], gathered: set[str], ring: int, gather: int) -> PlacementPlan:
    placements, units, codecs = [], [], {}
    for record in records:
        chunk_rows = [rows[c] for c in record.chunks]
        use = tuple(sorted(uses.get(record.name, ())))
        nbytes = layout.element_size(record.dtype) * math.prod(record.shape)
        stored = sum(row.stored_size for row in chunk_rows)
        indices: tuple[int, ...] = ()
        if record.name in streamed:
            region = Region.STREAMED
            indices = tuple(range(len(units), len(units) + len(streamed[record.name])))
            units.extend(streamed[record.name])
            for row in chunk_rows:
                codecs[row.codec.name] = codecs.get(row.codec.name, 0) + row.stored_size
        elif record.name in gathered:
            region = Region.GATHERED
        else:
            region = Region.STORAGE if PART_SEPARATOR in record.name else Region.COMPUTE
        placements.append(Placement(record.name, record.dtype, tuple(record.shape), region, nbytes, stored, use,
                                    indices))
    return PlacementPlan(budget, tuple(placements), tuple(units), ring, gather, codecs)
