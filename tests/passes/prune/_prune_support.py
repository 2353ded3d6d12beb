"""What the pruning tests share: seeded generators, correlated inputs, a reference top-k, a small MLP."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.nn import CompressedLinear

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int = 512, c: int = 64, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(n, c) inputs with correlated channels of very different scales."""
    mix = torch.randn(16, c, generator=gen(seed)) * torch.linspace(0.1, 3.0, c)
    return (torch.randn(n, 16, generator=gen(seed + 1)) @ mix + 0.1 * torch.randn(n, c, generator=gen(seed + 2))).to(dtype)


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / len(X)


def reference_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the `keep` largest entries of a 1-D tensor, ties to the lower index, by a Python sort."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:keep]
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order] = True
    return mask


class MLP(nn.Module):
    def __init__(self, dims=(32, 64, 48, 8), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))}
