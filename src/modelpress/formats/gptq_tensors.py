"""One GPTQ-format Linear (qweight, qzeros, scales, g_idx) as a modelpress encoding, codes and scales as stored.

The layout AutoGPTQ, GPTQModel and transformers+optimum write, for a Linear of `in` inputs, `out` outputs,
`bits` in (2, 3, 4, 8) and G = ceil(in / group_size) groups (one for group_size -1):

    qweight  int32 (in * bits / 32, out)   column o: the codes of output row o along the input dimension
    qzeros   int32 (G, out * bits / 32)    row g: the zero points of group g along the output dimension
    scales   float16 (G, out)
    g_idx    int32 (in,)                   the group of each input column (i // group_size without desc_act)

Both packed tensors hold a little-endian bit stream of `bits`-bit fields in little-endian 32-bit words:
field j occupies bits [j*bits, (j+1)*bits) of the stream (3-bit fields straddle words: 32 fields per 3
words). That is modelpress's own packing rule (encodings/packing.py) read in bytes, so a column of qweight,
its words taken as little-endian bytes, *is* a packed modelpress row: the import moves bytes, never
through float. Dequantised, w[o, i] = (q[o, i] - z[g_idx[i], o]) * s[g_idx[i], o].

Zero points: `gptq_v2` stores z; `gptq` (v1) stores z - 1, so z = (field + 1) mod 2^bits (GPTQModel's
field-wise v1 -> v2 rule). The two readings of an all-ones v1 field differ: the old AutoGPTQ v1 kernels
read it as z = 2^bits; GPTQModel reads it as 0 (its word-wise conversion also carries a 1 into the next
field). Symmetric checkpoints never hold one (z = 2^(bits-1) - 1 is stored); `gptq_encoding` reports how
many it saw so the loader can say so.

Mapping: z = 2^(bits-1) in every group (GPTQ's symmetric grid, bits >= 3) is our symmetric scheme
(w = (q - 2^(bits-1)) s, no zero array); anything else is our asymmetric scheme with the integer zeros as
float16 (exact: every integer up to 2048 is a float16), so (q - z) * s decodes exactly either way.
A g_idx that is not i // group_size (desc_act) is not a contiguous grouping; it comes back as the exact
float weight, with the reason (InputPermutedTensor handles the act-order case where it applies).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from modelpress.encodings.base import Encoding
from modelpress.encodings.packing import pack_codes, unpack_codes
from modelpress.encodings.permuted import InputPermutedTensor
from modelpress.encodings.quantized import PARAM_DTYPE, PER_CHANNEL, QuantizedTensor, QuantScheme
from modelpress.errors import FormatError

__all__ = ["GPTQ_BITS", "GPTQLayer", "gptq_encoding", "packed_bytes"]

GPTQ_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GPTQLayer:
    """What the import made of one layer: an encoding, or the exact float weight and why it is not an encoding."""

    weight: Encoding | torch.Tensor
    why_float: str | None = None
    wrapped_zeros: int = 0  # v1 zero fields that were all ones (read as 0, module docstring)


def packed_bytes(words: torch.Tensor) -> torch.Tensor:
    """(R, W) int32 words -> (R, 4W) uint8, each word's bytes least significant first (the file's order)."""
    a = np.ascontiguousarray(words.numpy())
    if sys.byteorder != "little":
        a = a.byteswap()
    return torch.from_numpy(a.view(np.uint8).reshape(a.shape[0], -1).copy())


def _bad(where: str, what: str) -> FormatError:
    return FormatError(f"{where}: {what}; use the GPTQ checkpoint's own files, unmodified")


def _check(where: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if t is None:
        raise _bad(where, f"{name} is missing")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise _bad(where, f"{name} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype} for this layer")
    return t


def gptq_encoding(tensors: dict[str, torch.Tensor | None], shape: tuple[int, int], bits: int, group_size: int,
                  v1: bool, where: str) -> GPTQLayer:
    """The layer `tensors` ({"qweight", "qzeros", "scales", "g_idx" (may be None)}) of an (out, in) weight holds."""
    out_f, in_f = shape
    if bits not in GPTQ_BITS:
        raise _bad(where, f"bits {bits} is not a GPTQ width modelpress reads ({GPTQ_BITS})")
    if (in_f * bits) % 32 or (out_f * bits) % 32 or in_f < 1 or out_f < 1:
        raise _bad(where, f"a {out_f}x{in_f} layer cannot be packed in 32-bit words at {bits} bits")
    gs = in_f if group_size == -1 else group_size
    groups = -(-in_f // gs)
    qweight = _check(where, "qweight", tensors.get("qweight"), (in_f * bits // 32, out_f), torch.int32)
    qzeros = _check(where, "qzeros", tensors.get("qzeros"), (groups, out_f * bits // 32), torch.int32)
    scales = _check(where, "scales", tensors.get("scales"), (groups, out_f), torch.float16)
    g_idx = tensors.get("g_idx")
    trivial = torch.arange(in_f, dtype=torch.int64) // gs
    if g_idx is None:
        g_idx = trivial
    else:
        g_idx = _check(where, "g_idx", g_idx, (in_f,), g_idx.dtype if g_idx.dtype in (torch.int32, torch.int64)
                       else torch.int32).to(torch.int64)
        if in_f and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise _bad(where, f"g_idx names a group outside [0, {groups})")
    if not torch.isfinite(scales).all():
        raise _bad(where, "a scale is not finite")

    codes = packed_bytes(qweight.t().contiguous())  # (out, in*bits/8): our packed rows, byte for byte
    fields = unpack_codes(packed_bytes(qzeros), bits, out_f)  # (G, out) uint8
    wrapped = 0
    if v1:
        wrapped = int((fields == (1 << bits) - 1).sum())
        fields = ((fields.to(torch.int16) + 1) & ((1 << bits) - 1)).to(torch.uint8)
    zero = fields.t().contiguous()  # (out, G)
    scale = scales.t().contiguous()  # (out, G) float16
    mid = 1 << (bits - 1)
    symmetric = bits >= 3 and bool((zero == mid).all())

    def quantized(packed: torch.Tensor) -> QuantizedTensor:
        scheme = QuantScheme(bits=bits, symmetric=symmetric, group_size=PER_CHANNEL if groups == 1 else gs)
        return QuantizedTensor(codes=packed, scale=scale, zero=None if symmetric else zero.to(PARAM_DTYPE),
                               scheme=scheme, tensor_shape=(out_f, in_f))

    if torch.equal(g_idx, trivial) and (groups == 1 or in_f % gs == 0):
        return GPTQLayer(quantized(codes), wrapped_zeros=wrapped)
    counts = torch.bincount(g_idx, minlength=groups)
    if in_f % gs == 0 and bool((counts == gs).all()):  # act order: a column permutation makes the groups contiguous
        order = torch.argsort(g_idx, stable=True)  # (in,): column j of the inner weight is column order[j]
        permuted = pack_codes(unpack_codes(codes, bits, in_f)[:, order], bits)
        return GPTQLayer(InputPermutedTensor(inner=quantized(permuted), order=order), wrapped_zeros=wrapped)
    q = unpack_codes(codes, bits, in_f).float()  # (out, in)
    w = (q - zero.float()[:, g_idx]) * scale.float()[:, g_idx]  # exact in float32: integer times float16
    why = ("its g_idx does not put group_size columns in every group" if in_f % gs == 0 else
           f"group_size {gs} does not divide its {in_f} inputs")
    return GPTQLayer(w, why_float=why, wrapped_zeros=wrapped)
