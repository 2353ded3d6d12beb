"""Tiny random causal LMs of every architecture issue 14 names, written as Hugging Face folders.

Each folder holds what a hub folder holds: config.json (with `architectures`), generation_config.json,
model.safetensors (saved by transformers, so a tied output layer is stored once), tokenizer.json (a
byte-level BPE with no merges: 256 byte tokens + 3 special tokens, built by hand, no training) and
tokenizer_config.json. Weights are seeded, so every run builds the same models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "phi3")
SPECIALS = ("<unk>", "<s>", "</s>")
VOCAB = 256 + len(SPECIALS)


def tokenizer_json(merge: bool = False) -> str:
    """The byte-level BPE; `merge`: one merge more ("t h" -> "th", id VOCAB), as llama.cpp loads only a BPE vocabulary
    with merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    if merge:
        vocab["th"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h")] if merge else [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok.to_str()


def config(arch: str):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, **small)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **small)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=None, **small)
    if arch == "phi3":
        return Phi3Config(tie_word_embeddings=False, **{**small, "num_key_value_heads": 4})
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=True, **common)
    raise ValueError(arch)


def write_tiny_lm(arch: str, folder: Path, seed: int = 0, merge: bool = False, **sizes) -> Path:
    """A seeded random model of `arch` saved as a Hugging Face causal-LM folder; returns the folder. `sizes` replace
    config fields (e.g. intermediate_size=256); `merge` gives the tokenizer one merge (and the model one token more)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config(arch)
    if merge:
        sizes = {"vocab_size": VOCAB + 1, **sizes}
    for key, value in sizes.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():  # wider weights than the 0.02 init, so that greedy tokens are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json(merge))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    return folder


_GGUF_NAMES = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
               ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
               ("post_attention_layernorm", "ffn_norm")]


def write_tiny_gguf(path: Path, seed: int = 0, drop: str | None = None) -> Path:
    """A seeded random tiny Llama as a float32 GGUF file (gguf's own writer; tied output layer, so no
    output.weight), with a byte-level tokenizer; `drop` leaves one tensor out (a file transformers would
    complete with random weights)."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    cfg = config("llama")
    torch.manual_seed(seed)
    state = AutoModelForCausalLM.from_config(cfg).state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = json.loads(tokenizer_json())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight" for ours, theirs in _GGUF_NAMES})
    for ours, theirs in names.items():
        if theirs != drop:
            writer.add_tensor(theirs, state[ours].numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
