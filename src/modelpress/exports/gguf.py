"""A Llama-family causal LM as one GGUF file that llama.cpp runs.

Each weight goes in as its own block type (`exports/gguf_tensors.py`: a modelpress grid that is a
llama.cpp block type is written with its codes and scales unchanged, anything else requantised and
listed), so a mixed-precision model is one file with a type per tensor. Tensor names are llama.cpp's
(`formats/gguf_llama.py`), and q/k rows are put in llama.cpp's rotary order (convert_hf_to_gguf's
permute; our reader undoes exactly this). A tied output layer is not written: llama.cpp then uses
token_embd. Norm weights are F32. The metadata is what llama.cpp's llama graph reads (`llama.*` from
the config) and the tokenizer (`exports/gguf_vocab.py`) with its chat template.
"""

from __future__ import annotations

import fnmatch
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch import nn

from modelpress.errors import ConfigError, ModelpressError, OutputExistsError, UnsupportedError
from modelpress.exports.gguf_tensors import F16, F32, TYPES, TensorExport, export_tensor
from modelpress.exports.gguf_vocab import tokenizer_metadata
from modelpress.fileio import fsync_dir, publish
from modelpress.fileio.writing import io_error
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.gguf_llama import gguf_name, permute_rows

__all__ = ["GGUFExport", "export_gguf"]

_BLOCK_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
# ggml type -> llama_ftype (LLAMA_FTYPE_MOSTLY_*; Q4_K as Q4_K_M)
_FILE_TYPES = {F32: 0, F16: 1, 2: 2, 3: 3, 6: 8, 7: 9, 8: 7, 12: 15, 14: 18}


@dataclass(frozen=True)
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    nbytes: int
    tensors: tuple[TensorExport, ...]

    @property
    def fallbacks(self) -> tuple[TensorExport, ...]:
        """Tensors asked for as a K-quant and written as llama.cpp's fallback type (rows not whole 256-blocks)."""
        return tuple(t for t in self.tensors if t.fallback)

    @property
    def requantised(self) -> tuple[TensorExport, ...]:
        return tuple(t for t in self.tensors if t.how == "requantised")

    def summary(self) -> str:
        """A line for the file, then one per kind of conversion: how many tensors, and the largest change of a
        weight it made (with the tensor where it was largest)."""
        groups: dict[tuple[str, str, str, str], list[TensorExport]] = {}
        for t in self.tensors:
            groups.setdefault((t.how, t.source, t.ggml_type, t.fallback), []).append(t)
        lines = [f"{self.path}: {self.nbytes / 1e6:.2f} MB, {len(self.tensors)} tensors"]
        for (how, source, kind, fallback), members in sorted(groups.items()):
            worst = max(members, key=lambda t: t.max_abs_change)
            lines.append(f"  {len(members):4d} x {source} -> {kind} {how}" + (f" ({fallback})" if fallback else "") +
                         f", max abs change {worst.max_abs_change:.3g}" +
                         (f" ({worst.name})" if worst.max_abs_change else ""))
        return "\n".join(lines)


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        raise UnsupportedError(f"GGUF export holds Llama-architecture causal LMs; this one is "
                               f"{getattr(config, 'model_type', type(model).__name__)!r}: export it with --format hf")
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default",
                                                         "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedError("GGUF export writes plain rotary embeddings; this model scales its rope: export it "
                               "with --format hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UnsupportedError("GGUF export of a Llama with biases is not supported: export it with --format hf")
    return config, float(rope.get("rope_theta", 10000.0))


def _architecture(config: Any, theta: float) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    meta = {
        "llama.context_length": config.max_position_embeddings, "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers, "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "llama.rope.freq_base": theta, "llama.rope.dimension_count": head_dim,
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "llama.vocab_size": config.vocab_size,
    }
    if head_dim * heads != config.hidden_size:
        meta.update({"llama.attention.key_length": head_dim, "llama.attention.value_length": head_dim})
    return meta


def _weight(module: nn.Module):
    encoding = getattr(module, "encoding", None)
    return encoding if encoding is not None else module.weight


def _weights(model: nn.Module, config: Any) -> dict[str, Any]:
    """{llama.cpp name: Encoding or float tensor} of every weight; the output layer left out when tied."""
    names = ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(config.num_hidden_layers)
                                      for m in _BLOCK_MODULES] + ["model.norm", "lm_head"]
    weights: dict[str, Any] = {}
    covered = set()
    for name in names:
        module = model.get_submodule(name)
        covered.add(name)
        if getattr(module, "bias", None) is not None:
            raise UnsupportedError(f"{name} has a bias, which llama.cpp's Llama graph has no place for: export "
                                   "with --format hf")
        weights[gguf_name(f"{name}.weight")] = _weight(module)
    extra = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] not in covered]
    if extra:
        raise UnsupportedError(f"the model holds weights a Llama GGUF has no place for ({extra[:3]}): export with "
                               "--format hf")
    if weights["output.weight"] is weights["token_embd.weight"]:
        del weights["output.weight"]  # tied: llama.cpp reads token_embd for the output layer
    return weights


def _wanted(name: str, types: Mapping[str, str]) -> int | None:
    """The type asked for a tensor: the last pattern (fnmatch on llama.cpp's name) that matches."""
    found = None
    for pattern, kind in types.items():
        if fnmatch.fnmatchcase(name, pattern):
            if kind not in TYPES:
                raise ConfigError(f"GGUF type {kind!r} is not one the export writes: use one of {sorted(TYPES)}")
            found = TYPES[kind]
    return found


def export_gguf(model: nn.Module, out: str | os.PathLike, *, types: Mapping[str, str] | None = None,
                float_type: str = "F16", tokenizer_pre: str | None = None, exact: bool = False,
                overwrite: bool = False) -> GGUFExport:
    """Write `model` (a CausalLM of the Llama architecture) to the GGUF file `out`.

    `types` maps llama.cpp tensor-name patterns to a type ("blk.*.ffn_down.weight": "Q6_K"), requantising where
    that is not the tensor's own grid; `float_type` is what float 2-D weights become (F16 or F32). `exact`
    refuses any weight the file would not hold as it is (requantised, offset rounded, float narrowed)."""
    if not isinstance(model, CausalLM):
        raise UnsupportedError(f"GGUF export holds causal LMs; this is a {type(model).__name__}: export it with "
                               "--format onnx or hf")
    if float_type not in ("F16", "F32"):
        raise ConfigError(f"float_type {float_type!r} is not F16 or F32")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{str(out)!r} already exists: choose another path or add --overwrite")
    config, theta = _config(model.model)
    meta = _architecture(config, theta)
    carried = getattr(config, "gguf_tokenizer_pre", None)  # the name the GGUF file it came from gave
    meta.update(tokenizer_metadata(model.support_files, config.vocab_size,
                                   tokenizer_pre or (carried if isinstance(carried, str) else None)))
    orders = {"attn_q": permute_rows(config.num_attention_heads * meta["llama.rope.dimension_count"],
                                     config.num_attention_heads),
              "attn_k": permute_rows(meta["llama.attention.head_count_kv"] * meta["llama.rope.dimension_count"],
                                     meta["llama.attention.head_count_kv"])}
    tensors, records = [], []
    for name, weight in _weights(model.model, config).items():
        part = name.split(".")[-2]
        data, kind, record = export_tensor(name, weight, _wanted(name, types or {}), TYPES[float_type],
                                           orders.get(part))
        if exact and record.max_abs_change:
            raise ConfigError(_not_exact(record))
        tensors.append((name, data, kind))
        records.append(record)
    sizes: dict[int, int] = {}
    for _, data, kind in tensors:
        if data.ndim == 2:
            sizes[kind] = sizes.get(kind, 0) + data.size
    meta["general.file_type"] = _FILE_TYPES[max(sizes, key=sizes.get)] if sizes else 0
    name = config.to_dict().get("_name_or_path") or "modelpress export"
    meta["general.name"] = str(name)
    _write(out, meta, tensors)
    return GGUFExport(out, out.stat().st_size, tuple(records))


def _not_exact(record: TensorExport) -> str:
    if record.how == "float":
        return (f"{record.name} is {record.source}, which {record.ggml_type} does not hold exactly: export with "
                "float_type F32 (--float-type F32)")
    return (f"{record.name} holds {record.source}, which no GGUF block type holds as it is ({record.how} to "
            f"{record.ggml_type}, max abs change {record.max_abs_change:.3g}); compress it on a block grid (the llm-q4 "
            "preset: symmetric 4-bit groups of 32 = Q4_0; symmetric 8-bit groups of 32 = Q8_0) or export without exact")


def _write(out: Path, meta: dict[str, Any], tensors: list[tuple[str, np.ndarray, int]]) -> None:
    """The file through gguf's writer, into a temporary sibling renamed into place."""
    import gguf

    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.part"
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        for key, value in meta.items():
            if key == "general.architecture":
                continue
            _add(writer, key, value)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, kind in tensors:
            if kind in (F32, F16):
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, ModelpressError):
            raise io_error("writing", out, exc) from None
        raise
    publish(tmp, out)
    fsync_dir(out.parent)


def _add(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        writer.add_uint32(key, int(value))
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"metadata {key}: {type(value).__name__}")

