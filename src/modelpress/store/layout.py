"""How a tensor's bytes become chunks: row blocks of about CHUNK_BYTES, and the dtypes a store holds.

Row-block ("block") layout: a tensor of shape (R, ...) is cut between rows, so every chunk holds
whole rows; a chunk's rows decode on their own, which is what partial reads, streaming and
parallel decoding need, and identical rows in two versions fall into identical chunks when the
rows before them are identical too. 0-D and 1-D tensors, and tensors whose rows are longer than
MAX_STEP, are cut between elements (so no chunk is ever larger than a few MiB).

Tensors stored with the `aligned` codec are cut so that every chunk but the last holds a multiple
of PAGE bytes as well as whole rows: a load can then map the chunk files one after another into
one contiguous tensor (file pages map only at page-aligned addresses).
"""

from __future__ import annotations

import math

import torch

from modelpress.errors import FormatError

__all__ = ["DTYPES", "CHUNK_BYTES", "ALIGN", "PAGE", "dtype_name", "torch_dtype", "split_rows", "tensor_bytes",
           "aligned"]

CHUNK_BYTES = 1 << 20  # 1 MiB of raw bytes: enough to compress well, small enough to decode in parallel
# `aligned` tensors are mapped, not decoded: each chunk costs a file's worth of system calls and a
# mapping, so they get fewer, larger chunks (measured on MiniLM: 6-8 ms less per load than 1 MiB)
ALIGNED_CHUNK_BYTES = 8 << 20
ALIGN = 64  # every tensor in a load arena starts on a 64-byte boundary (cache line, AVX-512)
PAGE = 4096  # `aligned` chunks: payload offset and size (but the last's) multiples of the x86-64 / common ARM page
MIN_BLOCK = 1024  # the smallest row block a writer may be asked for (`put(chunk_bytes=...)`)
MAX_STEP = 4 * CHUNK_BYTES  # rows whose lcm with PAGE exceeds this are cut by rows alone (loaded by copying)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise FormatError(f"the store cannot hold {dtype} tensors; convert to one of {sorted(DTYPES)}")
    return _NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FormatError(f"unknown dtype {name!r} in the catalogue; the store is corrupt or newer")
    return DTYPES[name]


_ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}


def element_size(name: str) -> int:
    return _ITEMSIZE[name] if name in _ITEMSIZE else torch_dtype(name).itemsize  # (the latter raises)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, row-major, without copying when it is already contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def split_rows(nbytes: int, shape: tuple[int, ...], itemsize: int, target: int = CHUNK_BYTES,
               multiple: int = 1) -> list[tuple[int, int]]:
    """(offset, length) of each chunk: whole rows (or elements for 0/1-D tensors and rows over MAX_STEP bytes),
    about `target` bytes each, and a multiple of `multiple` bytes each but the last where rows allow it (their
    lcm is at most MAX_STEP)."""
    if nbytes == 0:
        return []
    unit = max(itemsize * (math.prod(shape[1:]) if len(shape) >= 2 else 1), 1)
    if unit > MAX_STEP:  # a row this long is cut between elements, as a 1-D tensor is
        unit = max(itemsize, 1)
    step = math.lcm(unit, multiple)
    if step > max(MAX_STEP, target):
        step = unit
    per_chunk = max(1, target // step) * step
    return [(off, min(per_chunk, nbytes - off)) for off in range(0, nbytes, per_chunk)]


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN



def describe(dtype: str, shape: tuple[int, ...], raw_sizes: list[int], codecs: list[str]) -> str:
    """How a tensor is laid out in its chunks, in words: its row blocks (rows and bytes each) and codecs."""
    if not raw_sizes:
        return "empty"
    names = ",".join(sorted(set(codecs)))
    unit = element_size(dtype) * (math.prod(shape[1:]) if len(shape) >= 2 else 1)
    first = raw_sizes[0]
    if len(shape) < 2 or unit == 0 or any(size % unit for size in raw_sizes):
        return f"{len(raw_sizes)} block(s) of {first} bytes (cut between elements), {names}"
    return f"{len(raw_sizes)} row block(s) of {first // unit} rows ({first} bytes), {names}"
