"""One weight as a GGUF tensor: its encoding's own codes where the grid is a llama.cpp block type, else
requantised from the decoded weight.

Exact (codes and scales written unchanged, `formats/gguf_blocks.py` for the layouts):

    symmetric 8-bit, groups of 32              -> Q8_0   qs = code - 128, d = scale
    symmetric 4-bit (or 3-bit), groups of 32   -> Q4_0   q = code + 8 - 2^(b-1), d = scale
                                                         (a 3-bit grid is a subset of Q4_0's: same weights, 4 bits)
    asymmetric 2-4 bit, groups of 32           -> Q4_1   q = code, d = scale, m = float16(-zero * scale)

Q4_1's offset m is a float16 while ours is zero x scale (a float16 times a float16): it is rounded to the
nearest float16, every other bit kept; the summary gives the largest change of a weight this causes (0
when every product is a float16, as it is for a zero point of 0).

Anything else (per-channel int8, other group sizes, pruned, low-rank, clustered weights, float weights
asked to be quantised) is decoded to float32 and requantised by round to nearest (`quantise`), and
listed as requantised with the largest change of a weight. A type can be asked for per tensor.

K-quants (Q4_K, Q6_K) are only ever requantised (their two-level scales are no modelpress grid, see
`formats/gguf_blocks.py`) and need rows of whole 256-weight blocks. A tensor asked for as a K-quant whose
rows are not (SmolLM2's 576-wide inputs) falls back per tensor as llama.cpp's quantiser does (Q4_K -> Q5_0,
Q6_K -> Q8_0), and its record names the type asked for and why (`TensorExport.fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from modelpress.encodings.base import Encoding
from modelpress.encodings.quantized import QuantizedTensor
from modelpress.errors import ConfigError
from modelpress.formats.gguf_blocks import BLOCK, BYTES, K_FALLBACK, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q6_K, Q8_0, \
    dequantise, pack_q4_0, pack_q4_1, pack_q8_0, quantise

__all__ = ["F16", "F32", "TYPES", "TensorExport", "exact_type", "export_tensor"]

F32, F16 = 0, 1  # ggml type ids of the float types
TYPES = {"F32": F32, "F16": F16, "Q8_0": Q8_0, "Q4_0": Q4_0, "Q4_1": Q4_1, "Q5_0": Q5_0, "Q5_1": Q5_1, "Q4_K": Q4_K,
         "Q6_K": Q6_K}
NAMES = {v: k for k, v in TYPES.items()}


@dataclass(frozen=True)
class TensorExport:
    """How one tensor went into the file."""

    name: str  # llama.cpp's name
    ggml_type: str
    how: str  # "exact", "offset rounded", "requantised", "float"
    max_abs_change: float  # largest |written - model| over the tensor's weights
    source: str  # what the model held ("int4 sym g32", "float32", ...)
    fallback: str = ""  # where a K-quant was asked for and its rows are not whole 256-blocks: what was asked, and why


def exact_type(enc: Encoding | torch.Tensor) -> int | None:
    """The block type whose grid holds `enc`'s codes unchanged, or None."""
    if not isinstance(enc, QuantizedTensor) or enc.scheme.group_size != 32 or len(enc.shape) != 2:
        return None
    bits, sym = enc.scheme.bits, enc.scheme.symmetric
    if sym and bits == 8:
        return Q8_0
    if sym and bits <= 4:
        return Q4_0
    if not sym and bits <= 4:
        return Q4_1
    return None


def default_type(enc: Encoding | torch.Tensor, float_type: int) -> int:
    """What a tensor without an exact grid becomes: 1-D F32; float weights `float_type`; 8-bit and other encodings
    Q8_0 (the closest to their decoded weights); 2-4 bit grids of other shapes Q4_0 / Q4_1."""
    if isinstance(enc, torch.Tensor):
        return F32 if enc.dim() == 1 else float_type
    if len(enc.shape) == 1:
        return F32
    if isinstance(enc, QuantizedTensor) and enc.scheme.bits <= 4:
        return Q4_0 if enc.scheme.symmetric else Q4_1
    return Q8_0


def _describe(enc: Encoding | torch.Tensor) -> str:
    return str(enc.dtype).replace("torch.", "") if isinstance(enc, torch.Tensor) else enc.describe()


def _exact(enc: QuantizedTensor, kind: int, order: np.ndarray | None) -> tuple[np.ndarray, str]:
    """(R, row bytes) uint8 blocks of `enc`'s own codes and scales, rows in `order`."""
    rows, cols = enc.matrix_shape
    codes, scale = enc.int_codes().numpy(), enc.scale.numpy()  # (R, C) uint8, (R, G) float16
    zero = None if enc.zero is None else enc.zero.numpy()
    if order is not None:
        codes, scale = codes[order], scale[order]
        zero = None if zero is None else zero[order]
    q, d = codes.reshape(-1, 32), scale.reshape(-1)
    if kind == Q8_0:
        blocks = pack_q8_0((q.astype(np.int16) - 128).astype(np.int8), d)
    elif kind == Q4_0:
        blocks = pack_q4_0(q + np.uint8(8 - enc.scheme.midpoint), d)
    else:
        offset = -(zero.astype(np.float64) * scale.astype(np.float64)).reshape(-1)
        m = offset.astype(np.float16)
        blocks = pack_q4_1(q, d, m)
        return blocks.reshape(rows, -1), "exact" if np.array_equal(m.astype(np.float64), offset) else "offset rounded"
    return blocks.reshape(rows, -1), "exact"


def export_tensor(name: str, enc: Encoding | torch.Tensor, want: int | None, float_type: int,
                  order: np.ndarray | None = None) -> tuple[np.ndarray, int, TensorExport]:
    """(data, ggml type, record) for one weight: data is (R, row bytes) uint8 for a block type, float16/32 otherwise;
    `want` a type asked for (None: the exact grid, else the default); `order` a row order (llama.cpp's q/k rows)."""
    decoded = (enc.detach() if isinstance(enc, torch.Tensor) else enc.decode(torch.float32)).float().numpy()
    if order is not None:
        decoded = decoded[order]
    grid = exact_type(enc)
    kind = want if want is not None and decoded.ndim == 2 else grid if grid is not None else \
        default_type(enc, float_type)  # 1-D weights (norms) are F32 whatever is asked: llama.cpp reads them so
    if kind in (F32, F16):
        data = decoded.astype(np.float32 if kind == F32 else np.float16)
        change = float(np.abs(data.astype(np.float32) - decoded).max(initial=0.0))
        return data, kind, TensorExport(name, NAMES[kind], "float", change, _describe(enc))
    fallback = ""
    if kind in K_FALLBACK and decoded.ndim == 2 and decoded.shape[1] % BLOCK[kind]:
        fallback = (f"{NAMES[kind]} asked: rows of {decoded.shape[1]} are not whole {BLOCK[kind]}-weight blocks, "
                    f"{NAMES[K_FALLBACK[kind]]} instead (llama.cpp's fallback)")
        kind = K_FALLBACK[kind]
    if decoded.ndim != 2 or decoded.shape[1] % BLOCK[kind]:
        raise ConfigError(f"tensor {name} {tuple(decoded.shape)} cannot be {NAMES[kind]}: its rows are not whole "
                          f"blocks of {BLOCK[kind]}; ask for a type whose blocks divide them (Q8_0, Q4_0, Q4_1, Q5_0, "
                          "Q5_1: 32) or F16 for it")
    rows = decoded.shape[0]
    if kind == grid:
        data, how = _exact(enc, kind, order)
    else:
        data, how = quantise(decoded.reshape(-1, BLOCK[kind]), kind).reshape(rows, -1), "requantised"
    written = dequantise(data.reshape(-1, BYTES[kind]), kind).reshape(decoded.shape)
    change = float(np.abs(written - decoded).max(initial=0.0))
    return data, kind, TensorExport(name, NAMES[kind], how, change, _describe(enc), fallback)

