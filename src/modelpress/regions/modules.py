"""The modules a streamed model runs in place of the layers whose weights are not resident.

- `StreamedLinear`: an `nn.Linear` whose weight passes through the ring (ring.py) on every call, whole
  or (a large output layer) in pieces of whole rows, each piece's outputs computed from its rows alone.
  A one-piece weight runs exactly the matmul the resident layer runs (same shapes, same strides), so
  its outputs are bit-identical; pieces give each output row the same dot product, which BLAS may sum
  in another order (last-bit differences, never other greedy tokens in our tests).
- `GatherEmbedding`: an `nn.Embedding` whose table stays in the store; a lookup lands only the chunks
  that hold the rows it needs (row-block layout: every chunk holds whole rows) into one reusable
  buffer, one chunk at a time, and copies the rows out: bit-identical to `F.embedding`.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.store import layout
from modelpress.store.reader import ChunkReader, Scratch
from modelpress.store.rows import ChunkRow

from modelpress.regions.ring import Ring

__all__ = ["StreamedLinear", "GatherEmbedding"]


class StreamedLinear(nn.Module):
    """y = x W^T + b, W streamed through `ring` as units `pieces` (row ranges, in order)."""

    def __init__(self, ring: Ring, pieces: list[int], in_features: int, out_features: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.ring, self.pieces = ring, list(pieces)
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.pieces) == 1:
            index = self.pieces[0]
            weight = self.ring.acquire(index)  # (out, in), a view of the ring
            try:
                return F.linear(x, weight, self.bias)
            finally:
                self.ring.release(index)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for index in self.pieces:
            unit = self.ring.units[index]
            first, last = unit.first_row, unit.first_row + unit.shape[0]
            weight = self.ring.acquire(index)  # (rows, in)
            try:
                out[..., first:last] = F.linear(x, weight, None if self.bias is None else self.bias[first:last])
            finally:
                self.ring.release(index)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pieces={len(self.pieces)}"


class GatherEmbedding(nn.Module):
    """A lookup table read from the store row block by row block, only the blocks a lookup needs."""

    def __init__(self, reader: ChunkReader, dtype: str, shape: tuple[int, int], chunks: list[ChunkRow],
                 padding_idx: int | None = None):
        super().__init__()
        self.reader, self.dtype_name = reader, dtype
        self.num_embeddings, self.embedding_dim = shape
        self.padding_idx = padding_idx
        row_bytes = layout.element_size(dtype) * self.embedding_dim
        self.chunks = list(chunks)
        self.starts: list[int] = []  # first row of each chunk
        offset = 0
        for row in self.chunks:
            self.starts.append(offset // row_bytes)
            offset += row.raw_size
        largest = max((row.raw_size for row in self.chunks), default=0)
        self.buffer = torch.empty(largest, dtype=torch.uint8)  # (largest chunk,): reused by every lookup
        self._view = memoryview(self.buffer.numpy()) if largest else memoryview(bytearray())
        self._scratch = Scratch()
        self.row_bytes = row_bytes
        self.chunks_read = 0
        self.stored_read = 0

    @staticmethod
    def row_aligned(shape: tuple[int, ...], itemsize: int, chunks: list[ChunkRow]) -> bool:
        """Whether every chunk holds whole rows (what a gather needs)."""
        row_bytes = itemsize * shape[1]
        return len(shape) == 2 and row_bytes > 0 and all(row.raw_size % row_bytes == 0 for row in chunks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"embedding index out of range [0, {self.num_embeddings})")
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=layout.torch_dtype(self.dtype_name))
        wanted = sorted(set(flat.tolist()))
        by_chunk: dict[int, list[int]] = {}
        for token in wanted:
            by_chunk.setdefault(bisect.bisect_right(self.starts, token) - 1, []).append(token)
        for index, tokens in by_chunk.items():
            row = self.chunks[index]
            self.reader.land(row, self._view[:row.raw_size], self._scratch)
            self.chunks_read += 1
            self.stored_read += row.stored_size
            block = self.buffer[:row.raw_size].view(out.dtype).view(-1, self.embedding_dim)  # (rows, C)
            for token in tokens:
                out[flat == token] = block[token - self.starts[index]]
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, chunks={len(self.chunks)} (gathered from the store)"
