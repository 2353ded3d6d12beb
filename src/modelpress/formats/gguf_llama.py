"""Llama-architecture GGUF files dequantised by us, in seconds (transformers' GGUF reader takes ~40 s for
SmolLM2-135M, most of it parsing the vocabulary into numpy views twice and rebuilding a tensor-name map
per tensor).

The result is the model transformers' reader builds (tests compare both on a tiny file and on the
bundled SmolLM2): the config from the `llama.*` metadata as transformers maps it, each tensor read
once through fileio at the range `gguf.check_gguf` checked, dequantised by the gguf package's own
routines, renamed to transformers' names, and q/k rows put back in Hugging Face's rotary order
(llama.cpp's converter interleaves the two halves of each head). A file this path does not fully
understand (another architecture, rope scaling, a tensor it has no name for, a llama file that
transformers would read as Mistral) returns None and goes through transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress import fileio
from modelpress.errors import FormatError
from modelpress.formats.gguf_import import block_encoding, reorder_rows

__all__ = ["gguf_name", "hf_name", "llama_config", "llama_state", "permute_rows", "unpermute_rows"]

# llama.* metadata -> config field (transformers' GGUF_CONFIG_MAPPING for llama); anything else under
# llama.* sends the file to transformers' reader.
_CONFIG = {
    "llama.context_length": "max_position_embeddings",
    "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size",
    "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim",
    "llama.rope.freq_base": "rope_theta",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def llama_config(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any] | None:
    """config.json fields of a plain Llama GGUF file, or None where transformers' reader must decide."""
    name = metadata.get("general.name")
    if metadata.get("general.architecture") != "llama" or (isinstance(name, str) and "mistral" in name.lower()):
        return None
    if any(k.startswith("llama.") and k not in _CONFIG for k in metadata):
        return None  # rope scaling, experts, ...: not a plain Llama
    if any(hf_name(t) is None for t in tensor_names):
        return None
    fields: dict[str, Any] = {_CONFIG[k]: v for k, v in metadata.items() if k in _CONFIG}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fields.values()):
        raise FormatError("a llama.* or tokenizer id field of the GGUF file is not a number; use an intact .gguf file")
    if "rope_theta" in fields:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(fields.pop("rope_theta"))}
    if isinstance(name, str):
        fields["_model_name_or_path"] = name
    pre = metadata.get("tokenizer.ggml.pre")
    if isinstance(pre, str) and pre.isascii() and pre.isprintable() and len(pre) <= 64:
        fields["gguf_tokenizer_pre"] = pre  # llama.cpp's pre-tokenizer: transformers' tokenizer does not keep it
    fields["tie_word_embeddings"] = "output.weight" not in tensor_names
    fields.update(model_type="llama", architectures=["LlamaForCausalLM"], dtype="float32")
    return fields


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a llama.cpp tensor name (None for a name this reader does not know)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.weight"
    return None


def gguf_name(hf: str) -> str | None:
    """llama.cpp's name of a transformers Llama tensor name (None for one llama.cpp's llama graph has no place for)."""
    for theirs, ours in _GLOBAL.items():
        if ours == hf:
            return theirs
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[-1] == "weight":
        inner = ".".join(parts[3:-1])
        for theirs, ours in _BLOCK.items():
            if ours == inner:
                return f"blk.{int(parts[2])}.{theirs}.weight"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows (pairs interleaved) -> (first halves, second halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)  # (n_head*2*dim, C)


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """(rows,) index: row i of the Hugging Face q/k weight is row [i] of llama.cpp's (the inverse of permute_rows)."""
    return _unpermute(np.arange(rows), n_head)


def permute_rows(rows: int, n_head: int) -> np.ndarray:
    """(rows,) index: row i of llama.cpp's q/k weight is row [i] of the Hugging Face one (convert_hf_to_gguf's
    permute: within each head, (first halves, second halves) -> pairs interleaved)."""
    dim = rows // n_head // 2
    return np.arange(rows).reshape(n_head, 2, dim).swapaxes(1, 2).reshape(rows)


def llama_state(path: Path, tensors, config: dict[str, Any], keep_blocks: bool = False) -> dict[str, Any]:
    """Every tensor of the file (`gguf.check_gguf`'s table) under transformers' names: dequantised to float32, or
    with `keep_blocks` a QuantizedTensor where its blocks are a modelpress grid (`formats/gguf_import.py`)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    fd, _ = fileio.open_regular_sized(path, "GGUF file")
    state: dict[str, Any] = {}
    try:
        for t in tensors:
            raw = bytearray(t.nbytes)  # writable: an F32 tensor is a view of it
            if os.preadv(fd, [raw], t.offset) != t.nbytes:
                raise FormatError(f"{path}: tensor {t.name!r} ends past the end of the file; use an intact .gguf file")
            rows = t.numel // t.shape[0]
            blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1)
            heads_here = heads if ".attn_q." in t.name else kv_heads if ".attn_k." in t.name else None
            enc = block_encoding(blocks, t.ggml_type, (rows, t.shape[0]), f"{path}: tensor {t.name!r}") \
                if keep_blocks and len(t.shape) == 2 else None
            if enc is not None:
                state[hf_name(t.name)] = enc if not isinstance(heads_here, int) else \
                    reorder_rows(enc, unpermute_rows(rows, heads_here))
                continue
            w = dequantize(blocks, GGMLQuantizationType(t.ggml_type))
            w = np.ascontiguousarray(w.reshape(tuple(reversed(t.shape))), dtype=np.float32)  # GGUF dims: fastest first
            if isinstance(heads_here, int):
                w = _unpermute(w, heads_here)
            state[hf_name(t.name)] = torch.from_numpy(w)
    finally:
        os.close(fd)
    return state
