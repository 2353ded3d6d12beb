"""Tied weights through model surgery, on a toy language model (embedding table = output layer):
install rewrites every module of a tie with one encoding object, found by identity or by the record
kept when the model was built; retie refuses names that are not two matching parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.encodings.range_search import RangeSearch, quantize_weight
from modelpress.encodings.quantized import QuantScheme
from modelpress.errors import FormatError
from modelpress.nn import CompressedEmbedding, CompressedLinear, install
from modelpress.nn.tying import record_ties, retie, tied_modules, tied_parameters


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))  # (B, T, vocab)


def _int4(weight: torch.Tensor):
    return quantize_weight(weight.detach(), QuantScheme(bits=4, symmetric=True, group_size=8), RangeSearch.MINMAX)


def test_ties_are_found_by_identity():
    model = ToyLM()
    assert tied_parameters(model) == {"head.weight": "embed.weight"}
    assert tied_modules(model, "head") == ["embed"] and tied_modules(model, "mix") == []


@pytest.mark.parametrize("first", ["head", "embed"])
def test_install_gives_both_modules_one_encoding(first):
    model = ToyLM()
    ids = torch.tensor([[1, 2, 39]])
    enc = _int4(model.embed.weight)
    install(model, first, enc)
    assert isinstance(model.head, CompressedLinear) and isinstance(model.embed, CompressedEmbedding)
    assert model.head.encoding is enc and model.embed.encoding is enc
    table = enc.decode(torch.float32)
    assert torch.equal(model.embed(ids), table[ids])  # the lookup reads the shared encoded table
    x = torch.randn(3, 16)
    assert torch.allclose(model.head(x), x @ table.T, atol=1e-5)
    again = _int4(model.head.weight)  # a refining pass re-encodes one of them: both follow
    install(model, "embed", again)
    assert model.head.encoding is again


def test_a_rebound_weight_stays_tied_through_the_record():
    model = ToyLM()
    record_ties(model)
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())  # as GPTQ does while it calibrates
    enc = _int4(model.head.weight)
    install(model, "head", enc)
    assert model.embed.encoding is enc
    untracked = ToyLM()
    untracked.head.weight = nn.Parameter(untracked.head.weight.detach().clone())
    install(untracked, "head", enc)
    assert isinstance(untracked.embed, nn.Embedding)  # without a record (or identity) nothing else is touched


def test_retie_and_its_refusals():
    model = ToyLM()
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    retie(model, {"head.weight": "embed.weight"})
    assert model.head.weight is model.embed.weight
    for bad in ({"head.weight": "mix.weight"}, {"head.weight": "nowhere.weight"}, {"embed.weight": "embed.weight"}):
        with pytest.raises(FormatError):
            retie(ToyLM(), bad)
