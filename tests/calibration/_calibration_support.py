"""What the calibration tests share: a tiny transformer of repeated blocks, its batches, and statistics
computed directly from hooked whole forwards (the reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.calibration import LayerStats, real_tokens, run_blockwise
@dataclass
class T:
    """A target as passes see it: a module name (and, for passes, a module and config)."""

    name: str
    module: Any = None
    config: Any = None


class Block(nn.Module):
    """Attention (q, k, v read one input; o) and an MLP (up, down), called with a keyword mask."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h, attention_mask=None):  # (B, T, d), additive (B, 1, T)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5 + attention_mask
        h = self.norm(h + self.o(scores.softmax(-1) @ self.v(h)))
        return h + self.down(torch.relu(self.up(h)))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 16, layers: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.unused = nn.Linear(d, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])  # shorter: not the blocks

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        additive = (1.0 - attention_mask[:, None, :].float()) * -1e9
        for layer in self.layers:
            h = layer(h, attention_mask=additive)
        return self.pooler(h[:, 0])


BLOCK_LINEARS = ["q", "k", "v", "o", "up", "down"]
ALL = [f"layers.{i}.{n}" for i in range(3) for n in BLOCK_LINEARS] + ["pooler"]


def make_batches(n: int = 3, seed: int = 0, width: int = 10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (3, width), generator=g)
        mask = torch.ones(3, width, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def direct_stats(model, names, batches):
    """Each layer's real-token inputs from plain hooked full forwards, as X (N, C)."""
    xs = {n: [] for n in names}
    handles = []
    current = {}
    for n in names:
        def hook(module, args, n=n):
            xs[n].append(real_tokens(args[0], current["mask"]))

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat(x).double() for n, x in xs.items() if x}


def collect(model, names, calibration, **kwargs):
    """run_blockwise with a process that only records what it is given."""
    seen: dict[str, LayerStats] = {}
    order: list[list[str]] = []
    log: list[str] = []

    def process(group):
        order.append([t.name for t, _ in group])
        for t, stats in group:
            seen[t.name] = stats

    run_blockwise(model, [T(n) for n in names], calibration, process, log, **kwargs)
    return seen, order, log


def assert_stats_match(stats: LayerStats, X: torch.Tensor):
    assert stats.tokens == len(X)
    assert stats.hessian.dtype == torch.float32
    torch.testing.assert_close(stats.hessian.double(), X.T @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.mean_abs, X.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.abs_max.double(), X.abs().amax(0), rtol=1e-6, atol=1e-7)
