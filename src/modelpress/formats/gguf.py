"""`.gguf` files in: checked by our own bounded reader, then dequantised by transformers into a CausalLM.

A GGUF file (llama.cpp's format, little-endian) is

    magic "GGUF" | version u32 (2 or 3) | tensor count u64 | metadata count u64
    metadata:  key (string) | value type u32 | value        strings are u64 length + UTF-8 bytes;
                                                           arrays are element type u32 + count u64 + elements
    tensors:   name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    padding to `general.alignment` (default 32), then the tensor data; each offset is relative to
    the start of the data and a multiple of the alignment.

A GGUF file is as hostile as any other input (llama.cpp's reader has had a chain of CVEs from
unchecked counts and offsets). Before transformers' reader sees a file, `check_gguf` reads its
metadata (at most MAX_METADATA_BYTES, read once through fileio) and checks every count against the
bytes that remain, every string and array against the file, every tensor's type, dimensions and
byte range (inside the file, aligned, no two overlapping), and the memory its dequantised weights
take. After transformers built the model, every weight must have come from the file: a missing,
unexpected or mismatched tensor (which transformers would initialise at random) is refused.

A plain Llama file is dequantised by us (formats/gguf_llama.py: the same model, in seconds instead
of transformers' ~40 s); any other goes through transformers' reader. The support files a CausalLM
carries are derived from the file: config.json and generation_config.json from the metadata (or the
model transformers built), tokenizer.json, tokenizer_config.json and chat_template.jinja from the
tokenizer transformers builds from the file's vocabulary.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelpress import fileio
from modelpress.errors import FormatError, LimitExceededError, ModelpressError, UnsupportedError
from modelpress.formats.causal_lm import (CausalLM, causal_lm_from_files, causal_lm_tokenizer, fill_causal_lm,
                                         linearise_conv1d)
from modelpress.formats.gguf_llama import hf_name, llama_config, llama_state
from modelpress.limits import check_allocation
from modelpress.nn.provenance import record_provenance
from modelpress.nn.registry import install

__all__ = ["GGUFInfo", "GGUFTensor", "MAX_METADATA_BYTES", "check_gguf", "load_gguf"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_METADATA_BYTES = 256 << 20  # metadata + tensor table (a 128k-token vocabulary with merges is ~10 MB)
MAX_COUNT = 1 << 20  # tensors, metadata entries
MAX_DIMS = 4
MAX_NAME_BYTES = 4096  # a tensor name (llama.cpp: 64) or a metadata key
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: the first dimension varies fastest
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays as their length only ("<array of N>")
    tensors: tuple[GGUFTensor, ...]
    data_offset: int


class _Cursor:
    """Bounded little-endian reads from the metadata bytes; running out is a truncated (or oversized) file."""

    def __init__(self, data: memoryview, file_size: int, path: Path):
        self.data, self.pos, self.file_size, self.path = data, 0, file_size, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            if len(self.data) < self.file_size:
                raise LimitExceededError(f"{self.path}: GGUF metadata is larger than {MAX_METADATA_BYTES} bytes; "
                                         "this file is not one modelpress reads")
            raise _bad(self.path, "it ends inside its metadata (truncated)")
        piece = self.data[self.pos:self.pos + n]
        self.pos += n
        return piece

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, min_item_bytes: int, cap: int | None = None) -> int:
        """A u64 count of items that each take at least `min_item_bytes`: checked against what the file holds."""
        n = self.scalar("<Q")
        if (cap is not None and n > cap) or n * min_item_bytes > self.file_size - self.pos:
            raise _bad(self.path, f"it declares {n} {what}, more than the file holds")
        return n

    def string(self, limit: int | None = None) -> str:
        n = self.scalar("<Q")
        if limit is not None and n > limit:
            raise _bad(self.path, f"a name of {n} bytes (at most {limit})")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(self.path, "a string is not UTF-8") from None


def _bad(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: not a valid GGUF file: {what}; use an intact .gguf file")


def _value(cur: _Cursor, kind: int):
    """One metadata value: a scalar or string as itself; an array (of scalars or strings, never of arrays) is
    walked over and kept as "<array of N>" (the vocabulary is transformers' to read)."""
    if kind in _SCALARS:
        return cur.scalar(_SCALARS[kind])
    if kind == STRING:
        return cur.string()
    if kind == ARRAY:
        item = cur.scalar("<I")
        if item not in _SCALARS and item != STRING:
            raise _bad(cur.path, f"an array of value type {item} (arrays of arrays are not read)")
        n = cur.count("array items", struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8)
        if item in _SCALARS:
            cur.take(n * struct.calcsize(_SCALARS[item]))
        else:
            for _ in range(n):
                cur.take(cur.scalar("<Q"))
        return f"<array of {n}>"
    raise _bad(cur.path, f"unknown metadata value type {kind}")


def _type_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id -> (elements per block, bytes per block), from the gguf package's own table."""
    from gguf import GGML_QUANT_SIZES

    return {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


def check_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Read and check a GGUF file's metadata and tensor table (see the module docstring); nothing else is read."""
    path = Path(path)
    fd, size = fileio.open_regular_sized(path, "GGUF file")
    try:
        head = min(size, MAX_METADATA_BYTES)
        check_allocation(head, f"the metadata of {path}")
        data = os.pread(fd, head, 0)
    finally:
        os.close(fd)
    if len(data) != head:
        raise _bad(path, "it changed while being read")
    cur = _Cursor(memoryview(data), size, path)
    if len(data) < 24 or bytes(cur.take(4)) != MAGIC:
        raise _bad(path, "it does not start with GGUF")
    version = cur.scalar("<I")
    if version not in VERSIONS:
        raise UnsupportedError(f"{path}: GGUF version {version} is not supported (modelpress reads {VERSIONS}); "
                               "convert the model with a current llama.cpp")
    n_tensors = cur.count("tensors", 8 + 4 + 8 + 4 + 8, MAX_COUNT)
    n_kv = cur.count("metadata entries", 8 + 4, MAX_COUNT)
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string(MAX_NAME_BYTES)
        if key in metadata:
            raise _bad(path, f"metadata key {key!r} appears twice")
        metadata[key] = _value(cur, cur.scalar("<I"))
    tensors = _tensor_table(cur, n_tensors, path)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or not 1 <= alignment <= 1 << 16 or (
            alignment & (alignment - 1)):
        raise _bad(path, f"general.alignment {alignment!r} is not a power of two up to 65536")
    data_offset = -(-cur.pos // alignment) * alignment
    placed = _place(tensors, data_offset, alignment, size, path)
    return GGUFInfo(version, metadata, placed, data_offset)


def _tensor_table(cur: _Cursor, n: int, path: Path) -> list[tuple[str, tuple[int, ...], int, int]]:
    sizes = _type_sizes()
    table, names = [], set()
    for _ in range(n):
        name = cur.string(MAX_NAME_BYTES)
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _bad(path, f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        shape = tuple(cur.scalar("<Q") for _ in range(n_dims))
        kind, offset = cur.scalar("<I"), cur.scalar("<Q")
        if name in names:
            raise _bad(path, f"tensor {name!r} appears twice")
        if not all(1 <= d <= 1 << 40 for d in shape):
            raise _bad(path, f"tensor {name!r} has dimensions {shape}")
        if kind not in sizes:
            raise UnsupportedError(f"{path}: tensor {name!r} has ggml type {kind}, which this gguf package does not "
                                   "know; upgrade gguf or convert the model")
        block = sizes[kind][0]
        if shape[0] % block:
            raise _bad(path, f"tensor {name!r}: its rows ({shape[0]}) are not whole blocks of {block}")
        names.add(name)
        table.append((name, shape, kind, offset))
    return table


def _place(table, data_offset: int, alignment: int, size: int, path: Path) -> tuple[GGUFTensor, ...]:
    """Each tensor's byte range: aligned, inside the file, no two overlapping."""
    sizes = _type_sizes()
    placed = []
    for name, shape, kind, offset in table:
        block, block_bytes = sizes[kind]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel // block * block_bytes
        start = data_offset + offset
        if offset % alignment or start + nbytes > size:
            raise _bad(path, f"tensor {name!r} lies outside the file or is not aligned to {alignment}")
        placed.append(GGUFTensor(name, shape, kind, start, nbytes))
    ordered = sorted(placed, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise _bad(path, f"tensors {a.name!r} and {b.name!r} overlap")
    return tuple(placed)


def load_gguf(path: str | os.PathLike, keep_blocks: bool = False) -> CausalLM:
    """A float CausalLM from a .gguf file (checked first; a plain Llama dequantised by us, any other by transformers'
    GGUF reader). `keep_blocks`: a plain Llama's Q8_0 / Q4_0 (and exactly representable Q4_1) weights stay
    quantised, as modelpress encodings with the file's codes and scales (formats/gguf_import.py); the others
    (K-quants, Q5_*) are dequantised to float32, and `provenance(lm).log` says which went which way."""
    path = Path(path)
    info = check_gguf(path)
    numel = sum(t.numel for t in info.tensors)
    check_allocation(4 * numel, f"the dequantised weights of {path} ({numel:,} parameters in float32)")
    fields = llama_config(info.metadata, {t.name for t in info.tensors})
    if fields is not None:  # a plain Llama: dequantised here, in seconds
        files = _support_files(fields, _transformers_tokenizer(path))
        lm = causal_lm_from_files(files, source=path)
        _check_size(lm.model, numel, path)
        state = llama_state(path, info.tensors, fields, keep_blocks)
        kept = {name: enc for name, enc in state.items() if not isinstance(enc, torch.Tensor)}
        fill_causal_lm(lm, {name: enc if isinstance(enc, torch.Tensor) else enc.decode(torch.float32)
                            for name, enc in state.items()}, path)
        for name, enc in kept.items():
            install(lm, "model." + name.rpartition(".")[0], enc)
        if keep_blocks:
            record_provenance(lm, None, _import_log(info.tensors, kept))
        return lm
    if keep_blocks:
        raise UnsupportedError(f"{path}: only a plain Llama GGUF file is imported with its blocks kept; load it "
                               "without keep_blocks (dequantised)")
    model, tokenizer = _transformers_load(path)
    _check_size(model, numel, path)
    linearise_conv1d(model)
    model.eval()
    files = _support_files(model.config.to_dict(), tokenizer, model.generation_config)
    return CausalLM(model, causal_lm_tokenizer(files), files, source=path)  # the tokenizer a reload rebuilds


def _import_log(tensors, kept: dict[str, Any]) -> list[str]:
    """What an import with blocks kept did, a line per (type, outcome): kept as which encoding, or dequantised."""
    from gguf import GGMLQuantizationType

    groups: dict[str, list[str]] = {}
    for t in tensors:
        if len(t.shape) != 2 or t.ggml_type in (0, 1):  # F32 / F16 matrices are float as they stand
            continue
        kind = GGMLQuantizationType(t.ggml_type).name
        enc = kept.get(hf_name(t.name) or "")
        how = f"{kind} kept as {enc.describe()} (its codes and scales)" if enc is not None else \
            f"{kind} dequantised to float32 ({_WHY_NOT_KEPT.get(kind, 'no modelpress grid holds it')})"
        groups.setdefault(how, []).append(t.name)
    return [f"GGUF import: {len(names)} x {how}, e.g. {names[0]}" for how, names in sorted(groups.items())]


_WHY_NOT_KEPT = {"Q4_1": "offsets that no float16 zero point gives exactly",
                 "Q5_0": "5-bit codes", "Q5_1": "5-bit codes",
                 "Q4_K": "two-level scales, float16 times 6-bit, are no float16 scale per group",
                 "Q6_K": "two-level scales, float16 times int8, are no float16 scale per group; 6-bit codes"}


def _check_size(model: torch.nn.Module, numel: int, path: Path) -> None:
    """The model the metadata describes may not hold more weights than the file (tied ones counted once)."""
    params = {id(p): p.numel() for p in model.parameters()}
    if sum(params.values()) > numel:
        raise _bad(path, "the model its metadata describes has more weights than the file holds")


def _transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # as in _transformers_load
        raise FormatError(f"{path}: transformers cannot read the tokenizer of this GGUF file ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); use an intact .gguf file") from None


def _transformers_load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                              output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model.config.architectures = [type(model).__name__]
    except Exception as exc:  # transformers' and gguf's readers raise any error type for a file they cannot use
        if isinstance(exc, ModelpressError):
            raise
        raise FormatError(f"{path}: transformers cannot build a model from this GGUF file ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); use a GGUF file of a supported architecture") from None
    wrong = {k: sorted(v)[:3] for k, v in loading.items() if k in ("missing_keys", "unexpected_keys",
                                                                       "mismatched_keys") and v}
    if wrong:
        raise _bad(path, f"its tensors do not match the model its metadata describes ({wrong})")
    return model, tokenizer


def _support_files(config: dict[str, Any], tokenizer, generation=None) -> dict[str, bytes]:
    """config.json, generation_config.json and the tokenizer's files, derived from the config fields and the
    tokenizer transformers built (the generation config from the model config where none is given)."""
    from transformers import AutoConfig, GenerationConfig

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if generation is None:
        generation = GenerationConfig.from_model_config(AutoConfig.for_model(**config))
    files = {
        "config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
        "generation_config.json": generation.to_json_string().encode(),
        "tokenizer.json": tokenizer.backend_tokenizer.to_str().encode(),
    }
    fields = {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
              if getattr(tokenizer, key, None) is not None}
    files["tokenizer_config.json"] = json.dumps(fields, indent=2, sort_keys=True).encode()
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        files["chat_template.jinja"] = tokenizer.chat_template.encode()
    return files
