"""What the structured pruning tests share: seeded inputs, a tiny BERT, a small CNN, exact-up-to-summation checks."""

from __future__ import annotations

import torch
from torch import nn

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage(pass_name: str, **config) -> dict:
    return {"stages": [{"pass": pass_name, "config": config}]}


def tiny_bert(seed: int = 0):
    from transformers import AutoModel, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    return AutoModel.from_config(config, attn_implementation="sdpa", add_pooling_layer=False).eval()


def bert_inputs(seed: int = 0, batch: int = 3, tokens: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 60, (batch, tokens), generator=gen(seed))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run_bert(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float summation order (a matmul over fewer terms adds them in another order)."""
    torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * b.abs().max().item())


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def randomise_batchnorm(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
