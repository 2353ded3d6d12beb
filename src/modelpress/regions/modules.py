"""The modules a streamed model runs in place of the layers whose weights are not resident.

- `StreamedLinear`: an `nn.Linear` whose weight passes through the ring (ring.py) on every call, whole
  or (a large output layer) in pieces of whole rows, each piece's outputs computed from its rows alone.
  A one-piece weight runs exactly the matmul the resident layer runs (same shapes, same strides), so
  its outputs are bit-identical; pieces give each output row the same dot product, which BLAS may sum
  in another order (last-bit differences, never other greedy tokens in our tests).
- `GatherEmbedding`: an `nn.Embedding` whose table stays in the store; a lookup lands only the chunks
  that hold the rows it needs (row-block layout: every chunk holds whole rows) into one reusable
  buffer, one chunk at a time, and copies the rows out: bit-identical to `F.embedding`.
- `StreamedQLinear`: a quantised `CompressedLinear` whose packed codes (and scales) pass through the ring
  and are run by the packed-code kernel (nn/qmatmul.py) where they landed: the kernel the resident module
  runs, whose output rows do not depend on how many rows are computed at once (its C file's header), so
  whole weights and pieces both give the resident module's outputs bit for bit.
- `GatherQEmbedding`: a quantised table's lookup, the row blocks of its codes gathered from the store as
  `GatherEmbedding` does and their rows decoded with the resident scales (`QuantizedTensor.decode_rows`,
  elementwise: the values the resident module's lookup gives).
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import QuantizedTensor
from modelpress.encodings.quantized import QuantScheme
from modelpress.nn.qmatmul import prepare_qmatmul
from modelpress.store import layout
from modelpress.store.reader import ChunkReader, Scratch
from modelpress.store.rows import ChunkRow

from modelpress.regions.ring import Ring

__all__ = ["StreamedLinear", "StreamedQLinear", "GatherEmbedding", "GatherQEmbedding"]


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


class StreamedQLinear(nn.Module):
    """y = x W^T + b, W quantised (`scheme`): its codes and scales streamed through `ring` as one unit each
    piece, or its codes in pieces of whole rows with `scale` (and `zero`) resident."""

    def __init__(self, ring: Ring, pieces: list[int], scheme: QuantScheme, in_features: int, out_features: int,
                 bias: torch.Tensor | None, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None):
        super().__init__()
        self.ring, self.pieces, self.scheme = ring, list(pieces), scheme
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.scale, self.zero = scale, zero  # resident (R, G) float16, when the codes come in pieces

    def _encoding(self, landed, first: int) -> QuantizedTensor:
        if isinstance(landed, dict):  # the whole weight: codes, scale (and zero) in one unit
            codes, scale, zero = landed["codes"], landed["scale"], landed.get("zero")
        else:
            codes, last = landed, first + landed.shape[0]
            scale = self.scale[first:last]
            zero = None if self.zero is None else self.zero[first:last]
        return QuantizedTensor(codes=codes, scale=scale, zero=zero, scheme=self.scheme,
                               tensor_shape=(codes.shape[0], self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.pieces) == 1:
            index = self.pieces[0]
            landed = self.ring.acquire(index)
            try:
                return prepare_qmatmul(self._encoding(landed, 0), self.bias)(x)
            finally:
                self.ring.release(index)
        out = None
        for index in self.pieces:
            first = self.ring.units[index].first_row
            landed = self.ring.acquire(index)
            try:
                enc = self._encoding(landed, first)
                last = first + enc.shape[0]
                y = prepare_qmatmul(enc, None if self.bias is None else self.bias[first:last])(x)
            finally:
                self.ring.release(index)
            if out is None:
                out = y.new_empty(*y.shape[:-1], self.out_features)
            out[..., first:last] = y
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}, "
                f"pieces={len(self.pieces)}")


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
        self.out_dtype = layout.torch_dtype(dtype)
        self.chunks_read = 0
        self.stored_read = 0

    @staticmethod
    def row_aligned(shape: tuple[int, ...], itemsize: int, chunks: list[ChunkRow]) -> bool:
        """Whether every chunk holds whole rows (what a gather needs)."""
        if len(shape) != 2:
            return False
        row_bytes = itemsize * shape[1]
        return row_bytes > 0 and all(row.raw_size % row_bytes == 0 for row in chunks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"embedding index out of range [0, {self.num_embeddings})")
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=self.out_dtype)
        wanted = sorted(set(flat.tolist()))
        by_chunk: dict[int, list[int]] = {}
        for token in wanted:
            by_chunk.setdefault(bisect.bisect_right(self.starts, token) - 1, []).append(token)
        for index, tokens in by_chunk.items():
            row = self.chunks[index]
            self.reader.land(row, self._view[:row.raw_size], self._scratch)
            self.chunks_read += 1
            self.stored_read += row.stored_size
            first = self.starts[index]
            values = self._rows(self.buffer[:row.raw_size], first, torch.tensor(tokens) - first)  # (len(tokens), C)
            for i, token in enumerate(tokens):
                out[flat == token] = values[i]
        return out.reshape(*ids.shape, self.embedding_dim)

    def _rows(self, block: torch.Tensor, first: int, local: torch.Tensor) -> torch.Tensor:
        """Rows `local` of the row block landed in `block` (bytes), whose first row is `first`."""
        return block.view(layout.torch_dtype(self.dtype_name)).view(-1, self.embedding_dim)[local]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, chunks={len(self.chunks)} (gathered from the store)"


class GatherQEmbedding(GatherEmbedding):
    """A quantised table's lookup: the row blocks of its codes (`chunks`, uint8 (R, packed row bytes)) read
    from the store, the rows decoded with the resident `scale` (and `zero`)."""

    def __init__(self, reader: ChunkReader, scheme: QuantScheme, shape: tuple[int, int], codes_shape: tuple[int, int],
                 chunks: list[ChunkRow], scale: torch.Tensor, zero: torch.Tensor | None,
                 padding_idx: int | None = None):
        super().__init__(reader, "uint8", codes_shape, chunks, padding_idx)
        self.num_embeddings, self.embedding_dim = shape
        self.codes_width = codes_shape[1]
        self.scheme, self.scale, self.zero = scheme, scale, zero
        self.out_dtype = torch.float32

    def _rows(self, block: torch.Tensor, first: int, local: torch.Tensor) -> torch.Tensor:
        codes = block.view(-1, self.codes_width)  # (rows, packed row bytes)
        last = first + codes.shape[0]
        enc = QuantizedTensor(codes=codes, scale=self.scale[first:last],
                              zero=None if self.zero is None else self.zero[first:last], scheme=self.scheme,
                              tensor_shape=(codes.shape[0], self.embedding_dim))
        return enc.decode_rows(local)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme.describe()}, chunks={len(self.chunks)} "
                "(codes gathered from the store)")
