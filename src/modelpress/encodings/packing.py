"""Exact bit packing of integer codes of any width from 1 to 8 bits.

Byte layout (the same rule for every width): codes are packed along the last dimension, each row
independently, as a little-endian bit stream. Code `j` of a row occupies bits
`[j*b, (j+1)*b)` of the row's stream, where bit `k` of the stream is bit `k % 8` of byte
`k // 8`. For b < 8, rows are padded with zero codes to a multiple of 8 codes, so every group of 8 codes
fills exactly `b` bytes and a packed row is `ceil(n / 8) * b` bytes. Consequences:

- b=8: one code per byte, unchanged, no padding (a row is `n` bytes).
- b=4: byte `i` holds code `2i` in its low nibble and code `2i+1` in its high nibble.
- b=2: byte `i` holds codes `4i..4i+3`, lowest bits first.
- b=3: bytes `3i..3i+2` hold codes `8i..8i+7` as one little-endian 24-bit word.
- any other b (1, 5, 6, 7): bytes `bi..bi+b-1` hold codes `8i..8i+7` as one little-endian
  `8b`-bit word (b=1: byte `i` holds codes `8i..8i+7`, lowest bit first).

Quantisation codes use the widths in `SUPPORTED_BITS` (what `QuantScheme` accepts, and the
default of every function here); cluster indices (`encodings.clustered`) use any width in
`INDEX_BITS` and pass `widths=INDEX_BITS`. The rule, and so the bytes, are the same for both.

Rows stay independently addressable, so a row slice of packed codes is the packing of the row
slice (what partial loading and embedding gathers rely on).
"""

from __future__ import annotations

import torch

from modelpress.errors import ConfigError

__all__ = ["SUPPORTED_BITS", "INDEX_BITS", "pack_codes", "unpack_codes", "packed_row_bytes"]

SUPPORTED_BITS = (2, 3, 4, 8)  # quantisation code widths
INDEX_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # every width the layout packs


def _check_bits(bits: int, widths: tuple[int, ...]) -> None:
    if isinstance(bits, bool) or bits not in widths:
        raise ConfigError(f"unsupported bit width {bits}: use one of {widths}")


def packed_row_bytes(n_codes: int, bits: int, widths: tuple[int, ...] = SUPPORTED_BITS) -> int:
    """Bytes one packed row of `n_codes` codes takes (the one place this size is computed)."""
    _check_bits(bits, widths)
    if bits == 8:
        return n_codes
    return -(-n_codes // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int, widths: tuple[int, ...] = SUPPORTED_BITS) -> torch.Tensor:
    """(R, n) integer codes in [0, 2^bits) -> (R, packed_row_bytes(n, bits)) uint8; `bits` must be in `widths`."""
    _check_bits(bits, widths)
    if codes.dim() != 2:
        raise ValueError(f"pack_codes takes a 2-D (rows, codes) tensor, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    rows, n = codes.shape
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(rows, (n + pad) // 8, 8)  # (R, n/8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits  # (8,)
    words = (c << shifts).sum(-1)  # (R, n/8): 8 codes as one little-endian word of `bits` bytes
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8  # (bits,)
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # (R, n/8, bits)
    return packed.to(torch.uint8).reshape(rows, packed.shape[1] * bits)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int, widths: tuple[int, ...] = SUPPORTED_BITS) -> torch.Tensor:
    """Inverse of pack_codes: (R, packed bytes) uint8 -> (R, n_codes) uint8."""
    _check_bits(bits, widths)
    if packed.dim() != 2 or packed.shape[1] != packed_row_bytes(n_codes, bits, widths):
        raise ValueError(
            f"packed codes of shape {tuple(packed.shape)} do not hold {n_codes} {bits}-bit codes per row"
        )
    rows = packed.shape[0]
    if bits == 8:
        return packed
    if bits in (1, 2, 4):  # each byte holds whole codes: a cheap shift-and-mask path
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits  # (per_byte,)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (R, bytes, per_byte)
        return codes.reshape(rows, packed.shape[1] * per_byte)[:, :n_codes]
    groups = packed.shape[1] // bits
    b = packed.view(rows, groups, bits).to(torch.int64)  # (R, n/8, bits)
    words = (b << (torch.arange(bits, dtype=torch.int64) * 8)).sum(-1)  # (R, n/8)
    codes = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(rows, groups * 8)[:, :n_codes]
