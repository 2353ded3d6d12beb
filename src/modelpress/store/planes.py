"""Progressive precision: a float32 tensor stored as two planes, so that a load can stop at bfloat16.

A float32 tensor `name` stored "by planes" is two tensors in the version, and no tensor `name`:

- `name@bf16` (bfloat16, same shape): the value rounded to bfloat16 (round half up on the bit pattern:
  hi = (bits + 0x8000) >> 16, mod 2^16), i.e. sign, exponent and the high mantissa byte;
- `name@lo16` (int16, same shape): the rest, lo = bits - (hi << 16) (mod 2^32), which always lies in
  [-2^15, 2^15) and so fits a signed 16-bit integer.

bits = (hi << 16) + lo (mod 2^32) gives back every float32 bit pattern exactly (NaNs and infinities
included: the arithmetic is on integers). A load at bfloat16 precision reads the `@bf16` chunks only and
widens them (exactly) to float32; refining such a tensor reads the `@lo16` chunks only and adds them to
its bit pattern in place (it holds hi << 16 exactly), so nothing is read twice. The high plane codes
like a bfloat16 tensor (fans: ~1.5x; `grid` where it lies on a quantisation grid: SmolLM2 3.4x); the low
plane is close to random for trained weights, but not for weights dequantised from a coarser grid
(SmolLM2's Q4_1 GGUF: 3.1x), so the writer offers it the float codecs' byte planes too. Such weights stored
whole take `grid` at float32, which beats the two planes: SmolLM2 normal 90.4 MB, planar 175.7 MB.
"""

from __future__ import annotations

import torch

__all__ = ["HI", "LO", "split", "join", "refine_into", "plane_names", "base_name"]

HI, LO = "@bf16", "@lo16"  # suffixes no parameter name can carry ('@' is not in a Python identifier)


def plane_names(name: str) -> tuple[str, str]:
    return name + HI, name + LO


def base_name(name: str) -> str | None:
    """The tensor a plane belongs to, or None for a tensor that is not a plane."""
    for suffix in (HI, LO):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return None


def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi as bfloat16, lo as int16) of a float32 tensor (module docstring)."""
    bits = t.detach().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (…,) unsigned bit patterns
    hi = ((bits + 0x8000) >> 16) & 0xFFFF
    lo = (bits - (hi << 16) + (1 << 31)) % (1 << 32) - (1 << 31)  # in [-2^15, 2^15)
    hi16 = torch.where(hi >= 1 << 15, hi - (1 << 16), hi).to(torch.int16)
    return hi16.view(torch.bfloat16), lo.to(torch.int16)


def join(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The float32 tensor of its two planes, bit for bit."""
    out = hi.to(torch.float32)  # exact: bf16 -> f32 is the bit pattern shifted left by 16
    return refine_into(out, lo)


def refine_into(t: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Add the low plane to a float32 tensor that holds its high plane (hi << 16), in place."""
    bits = t.view(torch.int32)
    bits.add_(lo.to(torch.int32))  # wraps mod 2^32, as the split assumed
    return t
