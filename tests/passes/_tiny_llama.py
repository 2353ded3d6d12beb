"""The tiny Llama the LLM pass tests share: GQA (4 query heads over 2 key/value heads), SwiGLU, RMSNorm,
tied embeddings, widths that groups of 32 divide; and windows of token ids to calibrate it on."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(seed: int = 0, tied: bool = True, layers: int = 2) -> nn.Module:
    """A LlamaForCausalLM (hidden 64, 4 heads / 2 KV heads, SwiGLU 128, vocab 96) in float32, eval mode."""
    import transformers  # the importing test module has already skipped itself where it is missing

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights away from 1, so that folding a scale into them is visible
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.uniform_(0.5, 1.5)
    return model


def token_windows(n: int, length: int = 24, vocab: int = 96, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` calibration batches, each one (1, length) window of random token ids."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, length), generator=g)} for _ in range(n)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
