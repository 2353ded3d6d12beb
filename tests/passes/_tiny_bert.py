"""The tiny BERT the activation-aware pass tests share (AWQ, SmoothQuant, channel scales), and its inputs."""

from __future__ import annotations

import torch
from torch import nn


def tiny_bert(seed: int = 0) -> nn.Module:
    """A 2-layer BertModel (hidden 32, 2 heads, FFN 64) with weights large enough to make attention non-uniform."""
    import transformers  # the importing test module has already skipped itself where it is missing

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, initializer_range=0.2)
    return transformers.BertModel(config).eval()


def bert_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` batches of 4 sequences of 12 random ids; the first sequence padded after 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 8:] = 0
        out.append({"input_ids": torch.randint(0, 100, (4, 12), generator=g), "attention_mask": mask})
    return out


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state
