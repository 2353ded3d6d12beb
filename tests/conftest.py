"""Shared fixtures: a tiny model for fast tests, and the bundled MiniLM for the slow end-to-end ones."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TinyNet(nn.Module):
    """Embedding -> two Linear layers: every kind of module the presets rewrite."""

    def __init__(self, vocab: int = 50, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.norm(h + self.down(torch.relu(self.up(h))))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 as a float SentenceEncoder (loaded once per session)."""
    from modelpress.formats.hf import load_sentence_encoder

    return load_sentence_encoder("minilm")
