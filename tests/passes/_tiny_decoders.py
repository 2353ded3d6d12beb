"""Tiny random decoder LMs of the Llama family (Llama with and without grouped-query attention,
Mistral, Qwen2 with q/k/v biases) for the W8A8, channel-scale, pruning and structured tests, and
windows of token ids to calibrate and score them on."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 96


def tiny_decoder(arch: str = "llama", seed: int = 0, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                 hidden: int = 64, ffn: int = 128, tied: bool = True) -> nn.Module:
    """A float32 causal LM in eval mode; RMSNorm weights drawn away from 1 so that folds are visible."""
    import transformers  # the importing test module has already skipped itself where it is missing

    torch.manual_seed(seed)
    kinds = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_type, model_type = kinds[arch]
    config = config_type(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=tied, initializer_range=0.1)
    model = model_type(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


def windows(n: int, length: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` calibration batches, each one (1, length) window of random token ids."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (1, length), generator=g)} for _ in range(n)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def ids(seed: int = 5, length: int = 20, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
