"""Entropy coding of integer arrays in checkpoints: skewed codes become real byte savings.

Quantised codes, cluster indices and sparsity bitmasks are bit-packed, but their symbols are far
from uniform (a 4-bit code of a bell-shaped weight uses its middle values most), so their packed
bytes carry less information than their length. When saving, each 1-byte integer array of an
encoding is coded with the `fans` codec's order-0 rANS (`width` 1, the same C coder the store
uses) and kept coded only when that saves at least `codecs.MIN_SAVING` of its bytes.

The symbols are either the array's bytes (`symbol_bits` 8: for 1, 2, 4 and 8-bit packing a byte
holds whole codes, so an order-0 byte model captures the codes' distribution, jointly for the
codes sharing a byte) or its bits re-cut into `symbol_bits`-wide symbols (3, 5, 6, 7: the
packed stream read LSB-first as consecutive b-bit symbols, zero-padded at the end, so a 3-bit
code is one symbol instead of straddling bytes). The width that codes a sample smallest wins;
the transform is exact for any byte string, whatever its row layout.

A coded array is written as a flat uint8 array under its own name, and the manifest's
`entropy_coded` entry says how to restore it:

    "entropy_coded": {"<name>": {"codec": "fans", "dtype": "uint8", "shape": [...], "symbol_bits": 8}}

On loading, every entry is checked (known array, allowed dtype, sane shape, a size equal to the
symbol count in the payload's own header and within the memory available) before its buffer is
allocated, then decoded into exactly that buffer; the codec rejects any payload that does not fill it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.codecs import NATIVE_AVAILABLE, Fans, pays
from modelpress.errors import FormatError, UnsupportedError
from modelpress.limits import check_allocation

__all__ = ["entropy_code", "entropy_decode", "ENTROPY_KEY", "coder_available"]

ENTROPY_KEY = "entropy_coded"
CODEC = "fans"
MIN_BYTES = 64  # tinier arrays cost more in table than they could save
_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}
_MAX_ELEMENTS = 2**34
SYMBOL_BITS = (8, 3, 5, 6, 7)  # 8 = the bytes themselves; 1, 2 and 4-bit codes never straddle a byte
_SAMPLE_BYTES = 1 << 16
_PAYLOAD_HEADER = 6  # fans payload: u8 version, u8 width, u32 little-endian symbol count


def to_symbols(raw: np.ndarray, bits: int) -> np.ndarray:
    """The bytes `raw` read LSB-first as consecutive `bits`-wide symbols (zero-padded at the end).

    Every `bits` bytes hold exactly 8 symbols, so the stream is cut into such groups, each read as
    one little-endian 64-bit word and split by shifts.
    """
    if bits == 8:
        return raw
    groups = -(-len(raw) // bits)
    stream = np.zeros(groups * bits, np.uint8)
    stream[: len(raw)] = raw
    words = np.zeros((groups, 8), np.uint8)
    words[:, :bits] = stream.reshape(groups, bits)
    words = words.view("<u8").reshape(-1)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    symbols = ((words[:, None] >> shifts) & np.uint64((1 << bits) - 1)).astype(np.uint8).reshape(-1)
    return symbols[: symbol_count(len(raw), bits)]


def from_symbols(symbols: np.ndarray, bits: int, nbytes: int) -> np.ndarray:
    """Inverse of `to_symbols`: the first `nbytes` bytes of the symbols' bit stream."""
    if bits == 8:
        return symbols
    groups = -(-len(symbols) // 8)
    padded = np.zeros(groups * 8, np.uint64)
    padded[: len(symbols)] = symbols
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(padded.reshape(-1, 8) << shifts, axis=1).astype("<u8")
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, 8)[:, :bits]).reshape(-1)[:nbytes]


def symbol_count(nbytes: int, bits: int) -> int:
    return -(-nbytes * 8 // bits)


def coder_available() -> bool:
    """Whether the native rANS coder was built (it is optional; without it nothing is coded)."""
    return NATIVE_AVAILABLE


def _codec() -> Fans:
    return Fans(1)  # plain bytes, order-0 rANS


def entropy_code(tensors: dict[str, torch.Tensor], names: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`tensors` with each 1-byte array in `names` replaced by its coded bytes where that pays.

    Returns the new tensor dict and the manifest entries of the arrays that were coded.
    """
    if not coder_available():
        return tensors, {}
    codec = _codec()
    out = dict(tensors)
    entries: dict[str, Any] = {}
    for name in sorted(names):
        array = tensors[name]
        dtype = str(array.dtype).replace("torch.", "")
        if dtype not in _DTYPES or array.numel() < MIN_BYTES:
            continue
        raw = array.contiguous().view(torch.uint8).reshape(-1).numpy()
        sample = raw[:_SAMPLE_BYTES]
        bits = min(SYMBOL_BITS, key=lambda b: len(codec.encode(memoryview(to_symbols(sample, b)))))
        payload = codec.encode(memoryview(np.ascontiguousarray(to_symbols(raw, bits))))
        if not pays(len(payload), raw.nbytes):
            continue
        out[name] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        entries[name] = {"codec": CODEC, "dtype": dtype, "shape": list(array.shape), "symbol_bits": bits}
    return out, entries


def _checked_entry(name: str, entry: Any, where: Path) -> tuple[torch.dtype, tuple[int, ...]]:
    def bad(what: str) -> FormatError:
        return FormatError(f"{where}: entropy-coded array {name!r} {what}; the file is corrupt, re-save the model")

    if not isinstance(entry, dict) or set(entry) != {"codec", "dtype", "shape", "symbol_bits"}:
        raise bad("has an invalid entry")
    if entry["symbol_bits"] not in SYMBOL_BITS or isinstance(entry["symbol_bits"], bool):
        raise bad(f"has symbol_bits {entry['symbol_bits']!r}, not one of {sorted(SYMBOL_BITS)}")
    if entry["codec"] != CODEC:
        raise bad(f"names unknown codec {entry['codec']!r} (known: {CODEC!r}); upgrade modelpress")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in _DTYPES:
        raise bad(f"has dtype {entry['dtype']!r}, not one of {sorted(_DTYPES)}")
    shape = entry["shape"]
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or math.prod(shape) > _MAX_ELEMENTS):
        raise bad(f"has an invalid shape {shape!r}")
    return _DTYPES[entry["dtype"]], tuple(shape), entry["symbol_bits"]


def _check_payload_size(name: str, coded: torch.Tensor, count: int, where: Path) -> None:
    """The payload's own header (u8 version, u8 width, u32 symbol count) must declare the entry's size,
    checked before a buffer of that size is allocated."""
    head = bytes(coded[:_PAYLOAD_HEADER].numpy())
    if len(head) < _PAYLOAD_HEADER:
        raise FormatError(f"{where}: entropy-coded array {name!r} is shorter than its codec header; "
                          "the file is corrupt, re-save the model")
    width, declared = head[1], int.from_bytes(head[2:6], "little")
    if width != 1 or declared != count:
        raise FormatError(f"{where}: entropy-coded array {name!r} holds {declared} symbols of width {width}, its "
                          f"manifest entry needs {count} of width 1; the file is corrupt, re-save the model")


def entropy_decode(tensors: dict[str, torch.Tensor], entries: Any, where: Path) -> dict[str, torch.Tensor]:
    """Undo `entropy_code`: every array named in `entries` decoded back to its dtype and shape."""
    if not isinstance(entries, dict):
        raise FormatError(f"{where}: {ENTROPY_KEY} must be a mapping; the file is corrupt, re-save the model")
    if entries and not coder_available():
        raise UnsupportedError(
            f"{where}: the checkpoint's integer codes are entropy-coded, which needs the C extension "
            "modelpress.codecs._fcodec; reinstall modelpress where a C compiler is available"
        )
    out = dict(tensors)
    for name, entry in entries.items():
        dtype, shape, bits = _checked_entry(name, entry, where)
        coded = tensors.get(name)
        if coded is None or coded.dtype != torch.uint8 or coded.dim() != 1:
            raise FormatError(f"{where}: entropy-coded array {name!r} is missing or not a flat uint8 array; "
                              "the file is corrupt, re-save the model")
        nbytes = math.prod(shape) * dtype.itemsize
        _check_payload_size(name, coded, symbol_count(nbytes, bits), where)
        check_allocation(symbol_count(nbytes, bits) + nbytes, f"{where}: entropy-coded array {name!r}")
        symbols = np.empty(symbol_count(nbytes, bits), np.uint8)
        try:
            _codec().decode_into(memoryview(coded.contiguous().numpy()), memoryview(symbols))
        except FormatError as exc:
            raise FormatError(f"{where}: entropy-coded array {name!r}: {exc}; re-save the model") from None
        if bits < 8 and symbols.size and int(symbols.max()) >= 1 << bits:
            raise FormatError(f"{where}: entropy-coded array {name!r} decodes to symbols wider than {bits} bits; "
                              "the file is corrupt, re-save the model")
        raw = from_symbols(symbols, bits, nbytes)
        out[name] = torch.from_numpy(raw.copy() if bits == 8 else raw).view(dtype).reshape(shape)
    return out
