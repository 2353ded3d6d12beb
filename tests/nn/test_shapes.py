"""Slicing layers keeps exactly the chosen rows and columns (nn/shapes.py)."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.nn.shapes import slice_batchnorm, slice_conv, slice_linear


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_slices_equal_plain_indexing():
    lin = nn.Linear(6, 5)
    rows, cols = torch.tensor([0, 3, 4]), torch.tensor([1, 5])
    new = slice_linear(lin, rows, cols)
    assert torch.equal(new.weight, lin.weight[rows][:, cols]) and torch.equal(new.bias, lin.bias[rows])
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    out, inp = torch.tensor([1, 2, 5]), torch.tensor([0, 3])
    small = slice_conv(conv, out, inp)
    x = torch.randn(2, 4, 7, 7, generator=gen(0))
    torch.testing.assert_close(small(x[:, inp]), conv(x * torch.tensor([1.0, 0, 0, 1.0])[:, None, None])[:, out])


def test_batchnorm_slices_keep_their_channels_statistics():
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=gen(1)))
        bn.running_var.copy_(torch.rand(5, generator=gen(2)) + 0.5)
        bn.weight.copy_(torch.randn(5, generator=gen(3)))
    idx = torch.tensor([0, 2, 4])
    x = torch.randn(2, 5, 3, 3, generator=gen(4))
    torch.testing.assert_close(slice_batchnorm(bn, idx)(x[:, idx]), bn(x)[:, idx])
