"""The toy sentence encoder the sensitivity tests (tests/search/) and the CLI's share: one layer made sensitive."""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

from modelpress.compress import compress
from modelpress.recipe import Recipe, Selector, Stage

SENSITIVE = "blocks.1.down"
WORDS = ("model", "weights", "layer", "store", "quantise", "group", "scale", "zero", "token", "batch",
         "sentence", "cosine", "table", "kernel", "prune", "rank", "block", "cache", "float", "bytes")


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))


class ToyEncoder(nn.Module):
    """A sentence encoder in miniature: word ids -> embedding -> 3 residual MLP blocks -> mean -> head."""

    def __init__(self, vocab: int = 97, dim: int = 32, hidden: int = 64, blocks: int = 3):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(blocks))
        self.head = nn.Linear(dim, dim)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        ids = [[sum(map(ord, w)) % (self.vocab - 1) + 1 for w in s.split()] for s in sentences]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])  # (B, T)
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        return self.head((h * mask).sum(1) / mask.sum(1))  # (B, C)


def toy_encoder() -> ToyEncoder:
    """The toy with SENSITIVE made sensitive: its weights scaled up 3x (block 1 dominates the embedding),
    and one huge weight in every group of 16 on an input that is always ~0 (a hidden unit that GELU
    turns off). The huge weights change nothing in float, but a 4-bit group must spend its range on
    them, so the weights that matter are rounded away."""
    torch.manual_seed(0)
    model = ToyEncoder().eval()
    up, down = model.blocks[1].up, model.blocks[1].down
    dead = slice(0, 64, 16)
    with torch.no_grad():
        up.weight[dead], up.bias[dead] = 0.0, -10.0  # GELU(-10) ~ -8e-23
        down.weight.mul_(3.0)
        down.weight[:, dead] = 50 * down.weight.abs().max()
    return model


def toy_sentences(n: int = 48, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


RECIPE = Recipe.from_dict({"name": "toy4", "stages": [
    {"pass": "rtn", "targets": {"types": ["Linear"]},
     "config": {"bits": 4, "symmetric": False, "group_size": 16, "search": "mse"}},
    {"pass": "rtn", "targets": {"types": ["Embedding"]},
     "config": {"bits": 4, "symmetric": False, "group_size": 32, "search": "mse"}},
]})
LAYERS = ["embed", "blocks.0.up", "blocks.0.down", "blocks.1.up", SENSITIVE, "blocks.2.up", "blocks.2.down", "head"]


def encode(model: nn.Module, sentences: list[str]) -> torch.Tensor:
    """The plain reference: one whole forward per sentence (no batching, no replay)."""
    with torch.inference_mode():
        return torch.cat([model(**model.tokenize([s])) for s in sentences])


def alone(model: nn.Module, recipe: Recipe, name: str) -> nn.Module:
    """A copy of `model` with only layer `name` compressed, by the recipe stage that selects it."""
    for stage in recipe.stages:
        if any(t.name == name for t in stage.resolve(model, set())):
            one = Stage(stage.pass_name, stage.config, Selector(include=(name,)), stage.overrides)
            return compress(copy.deepcopy(model), Recipe((one,)))
    raise AssertionError(name)
