"""Memory accounting: every reachable tensor storage once (closures of prepared kernels included),
and the peak of the resident set over a block of work."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from modelpress.encodings import PER_CHANNEL, QuantScheme, quantize
from modelpress.evaluate.memory import peak_rss, resident_bytes, rss_bytes
from modelpress.evaluate.size import size_report
from modelpress.nn import CompressedLinear, Kernel


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_plain_modules_count_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32))
    expected = _bytes(*model.parameters(), *model.buffers())
    assert resident_bytes(model) == expected
    assert size_report(model).bytes == expected  # the stored view agrees for plain float tensors


def test_tied_and_viewed_tensors_count_once():
    embed, head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=False)
    head.weight = embed.weight  # tied, as a language model's output layer
    model = nn.ModuleDict({"embed": embed, "head": head})
    model.register_buffer("view", embed.weight.data[:10])  # a view of the same storage
    assert resident_bytes(model) == _bytes(embed.weight)
    assert size_report(model).bytes == _bytes(embed.weight) + _bytes(model.view)  # stored: the view is a tensor
    assert [row.name for row in size_report(model).layers].count("head.weight") == 0


def test_prepared_kernels_show_what_they_keep():
    """A dense kernel decodes the weight once: the decoded copy sits in a closure and is counted."""
    weight = torch.randn(64, 32)
    enc = quantize(weight, QuantScheme(bits=8, symmetric=True, group_size=PER_CHANNEL))
    layer = CompressedLinear(enc, kernel=Kernel.DENSE)
    encoded = sum(t.untyped_storage().nbytes() for t in enc.arrays().values())
    assert resident_bytes(layer) == encoded
    layer(torch.randn(2, 32))
    assert resident_bytes(layer) == encoded + _bytes(weight)
    layer.release()
    assert resident_bytes(layer) == encoded


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_peak_rss_sees_a_temporary_allocation():
    big = 64 << 20
    with peak_rss() as before:
        pass
    with peak_rss() as during:
        block = torch.ones(big // 4)  # 64 MiB, touched
        del block
    assert rss_bytes() is not None and during.before_bytes is not None
    assert during.increase_bytes >= big * 0.9
    assert before.increase_bytes < big * 0.5  # the mark was reset: an earlier peak does not leak in
