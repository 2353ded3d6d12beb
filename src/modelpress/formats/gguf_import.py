"""llama.cpp blocks as modelpress encodings, codes and scales as stored (no detour through float).

    Q8_0 -> symmetric 8-bit groups of 32:  code = qs + 128, scale = d                       exact
    Q4_0 -> symmetric 4-bit groups of 32:  code = q, scale = d (w = (q - 8) d either way)    exact
    Q4_1 -> asymmetric 4-bit groups of 32: code = q, scale = d, zero = -m / d as a float16,
            only where that zero is exact for every block (zero x d == -m); else None

A Q4_1 block's offset m is any float16, ours is zero x scale with a float16 zero: most files (the bundled
SmolLM2's among them) have blocks where no float16 zero gives m exactly, and those tensors are dequantised
to float by the caller rather than moved off their weights. Q5_0/Q5_1 (5-bit codes) and the K-quants have
no modelpress grid: None, dequantised by the caller (`load_gguf` logs which, in the model's provenance).
A K-quant's step is a float16 super-scale times a 6-bit (Q4_K) or int8 (Q6_K) sub-scale, a product that is
not a float16 in general, so no float16 scale per group holds it; exact import would need float32 scales
or a two-level scale in QuantizedTensor, which every kernel would then have to read. A scale that is not
finite is a damaged file.
"""

from __future__ import annotations

import numpy as np
import torch

from modelpress.encodings.packing import pack_codes
from modelpress.encodings.quantized import QuantizedTensor, QuantScheme
from modelpress.errors import FormatError
from modelpress.formats.gguf_blocks import BYTES, Q4_0, Q4_1, Q8_0, unpack_q4_0, unpack_q4_1, unpack_q8_0

__all__ = ["block_encoding", "reorder_rows"]


def block_encoding(raw: np.ndarray, ggml_type: int, shape: tuple[int, int], where: str) -> QuantizedTensor | None:
    """The encoding of an (R, C) weight stored as `raw` ((R, row bytes) uint8 blocks of `ggml_type`), or None."""
    rows, cols = shape
    if ggml_type not in (Q8_0, Q4_0, Q4_1) or cols % 32:
        return None
    blocks = raw.reshape(rows * cols // 32, BYTES[ggml_type])
    zero = None
    if ggml_type == Q8_0:
        q, d = unpack_q8_0(blocks)
        codes, bits, symmetric = (q.astype(np.int16) + 128).astype(np.uint8), 8, True
    elif ggml_type == Q4_0:
        (codes, d), bits, symmetric = unpack_q4_0(blocks), 4, True
    else:
        codes, d, m = unpack_q4_1(blocks)
        bits, symmetric = 4, False
        d64, m64 = d.astype(np.float64), m.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = (-m64 / d64).astype(np.float16)
        if not np.isfinite(zero).all() or not np.array_equal(zero.astype(np.float64) * d64, -m64):
            return None
    if not np.isfinite(d).all():
        raise FormatError(f"{where}: a block scale is not finite; use an intact .gguf file")
    groups = cols // 32
    return QuantizedTensor(
        codes=pack_codes(torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols))), bits),
        scale=torch.from_numpy(d.reshape(rows, groups).copy()),
        zero=None if zero is None else torch.from_numpy(zero.reshape(rows, groups).copy()),
        scheme=QuantScheme(bits=bits, symmetric=symmetric, group_size=32), tensor_shape=(rows, cols))


def reorder_rows(enc: QuantizedTensor, order: np.ndarray) -> QuantizedTensor:
    """`enc` with its rows (codes, scales, zeros) taken in `order`: packed rows move whole."""
    index = torch.from_numpy(np.asarray(order, dtype=np.int64))
    return QuantizedTensor(codes=enc.codes[index].contiguous(), scale=enc.scale[index].contiguous(),
                           zero=None if enc.zero is None else enc.zero[index].contiguous(), scheme=enc.scheme,
                           tensor_shape=enc.tensor_shape)
