"""safetensors files, written in parts through fileio and read as views of one checked buffer.

The layout (https://github.com/huggingface/safetensors, the reference reader is used in the tests):

    u64 little-endian N | N bytes of JSON header, padded with spaces to a multiple of 8 | data

    header: {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [2, 3],
             "data_offsets": [begin, end]}, ...}   offsets relative to the start of the data

Writing: `serialise` returns the header and one memoryview per tensor (no copy of the data), in the
reference writer's order (by dtype, from 64-bit down, then by name: every tensor stays aligned), so the
bytes are the reference writer's exactly (bar the order of metadata keys, which it writes in hash
order and we sort); `fileio.write_temp` writes them, with a fault point before each part.

Reading: `parse` audits the header before it makes a tensor: size within the buffer and the JSON
caps, only known dtypes, shapes of non-negative integers whose byte size equals the offsets, and
offsets that tile the data exactly (no overlap, no hole, nothing past the end). Tensors are views
of the buffer (no second copy); one whose offset is not aligned to its element size is copied.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping

import torch

from modelpress.errors import FormatError
from modelpress.limits import MAX_JSON_BYTES
from modelpress.safeparse import load_json

__all__ = ["DTYPES", "serialise", "parse"]

# In the reference's order of dtypes (its Rust enum): it writes the highest first, then by name.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_RANK = {dtype: rank for rank, dtype in enumerate(DTYPES.values())}
_MAX_DIMS = 16


def serialise(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> list[Any]:
    """The parts of a safetensors file holding `tensors` (header bytes, then one view per tensor)."""
    order = sorted(tensors, key=lambda name: (-_RANK.get(tensors[name].dtype, -1), name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    parts: list[Any] = []
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _NAMES:
            raise FormatError(f"tensor {name!r} has dtype {tensor.dtype}, which a checkpoint cannot hold; "
                              f"convert it to one of {sorted(str(d) for d in _NAMES)}")
        flat = tensor.detach().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        if nbytes:
            parts.append(memoryview(flat.view(torch.uint8).numpy()))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *parts]


def _entry(name: str, entry: Any, bad) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {name!r} has an invalid header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"tensor {name!r} has dtype {dtype!r}, not one of {sorted(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise bad(f"tensor {name!r} of shape {shape} {dtype} does not fill its data_offsets {offsets}")
    return DTYPES[dtype], tuple(shape), begin, end


def parse(buffer: bytearray, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer` (writable, so tensors can be views of it)."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{where}: {what}; the file is corrupt or not a safetensors file, re-save the model")

    if len(buffer) < 8:
        raise bad("the file is shorter than its 8-byte header length")
    (size,) = struct.unpack_from("<Q", buffer)
    if size > min(len(buffer) - 8, MAX_JSON_BYTES):
        raise bad(f"the header claims {size} bytes, the file has {len(buffer) - 8} after the length")
    header = load_json(bytes(buffer[8:8 + size]), f"{where}: safetensors header", hint="re-save the model")
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    start, data_size = 8 + size, len(buffer) - 8 - size
    entries = {name: _entry(name, entry, bad) for name, entry in header.items()}
    covered = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != covered:
            raise bad(f"tensor {name!r} starts at {begin}, not at {covered} where the one before ends "
                      "(overlapping or with a hole)")
        covered = end
    if covered != data_size:
        raise bad(f"the tensors cover {covered} bytes of data, the file holds {data_size}")
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif (start + begin) % dtype.itemsize:
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=start + begin)
            tensors[name] = raw.clone().view(dtype).reshape(shape)
        else:
            count = (end - begin) // dtype.itemsize
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin).reshape(shape)
    return tensors
