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


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
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


def write_tiny_lm(arch: str, folder: Path, seed: int = 0) -> Path:
    """A seeded random model of `arch` saved as a Hugging Face causal-LM folder; returns the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch), attn_implementation="sdpa")
    with torch.no_grad():  # wider weights than the 0.02 init, so that greedy tokens are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    return folder
