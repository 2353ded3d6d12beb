"""Pruning, low rank and k-means on Llama-family decoder blocks (tiny random models): Wanda and SparseGPT,
calibrated block by block on token windows, keep the logits closer to the original's than magnitude
pruning at the same sparsity (50% and 2:4), each block Linear holds exactly the sparsity asked for, the
pruned model generates; whitened low rank beats plain low rank at the same rank; k-means runs too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress
from modelpress.encodings import LowRankTensor
from modelpress.encodings.clustered import ClusteredTensor
from modelpress.encodings.sparse import SparseTensor
from modelpress.nn import CompressedLinear

transformers = pytest.importorskip("transformers")

from _tiny_decoders import logits, tiny_decoder, windows  # noqa: E402

BLOCKS = "model.layers.*"


def outlier_decoder(arch: str = "llama"):
    """A tiny decoder whose block inputs have a few large channels (as real LLMs' do): the RMSNorms scale
    8 of 64 channels by 6-10x, so the weights that read them matter more than their magnitude says."""
    model = tiny_decoder(arch, layers=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("layernorm"):
                channels = torch.randperm(64, generator=g)[:8]
                module.weight[channels] *= torch.rand(8, generator=g) * 4 + 6
    return model


def error(model, reference, x) -> float:
    return float((logits(model, x) - reference).pow(2).mean())


def pruned(model, pass_name: str, calibration, **config):
    return modelpress.compress(copy.deepcopy(model), {"stages": [
        {"pass": pass_name, "config": config, "targets": {"include": [BLOCKS]}}]}, calibration=calibration)


def block_linears(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, CompressedLinear)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_wanda_and_sparsegpt_beat_magnitude_on_decoder_blocks(arch, pattern):
    model = outlier_decoder(arch)
    calibration = windows(8, length=32)
    x = torch.cat([w["input_ids"] for w in windows(4, length=32, seed=11)])  # not the calibration windows
    reference = logits(model, x)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = pruned(model, method, calibration if method != "magnitude" else None, **pattern)
        layers = block_linears(out)
        assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
        for name, layer in layers.items():
            enc = layer.encoding
            assert isinstance(enc, SparseTensor)
            dense = enc.decode(torch.float32)
            assert int((dense != 0).sum()) <= dense.numel() // 2, name
            if "pattern" in pattern:  # 2 kept in every 4 consecutive inputs of a row
                assert int((dense.reshape(dense.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
        errors[method] = error(out, reference, x)
    assert errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_a_pruned_decoder_generates():
    model = outlier_decoder()
    out = pruned(model, "sparsegpt", windows(4), sparsity=0.5)
    tokens = out.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, do_sample=False)
    assert tokens.shape == (1, 10)


def test_lowrank_runs_on_decoder_blocks_and_whitening_beats_plain():
    model = outlier_decoder()
    calibration = windows(8, length=32)
    x = torch.cat([w["input_ids"] for w in calibration])  # whitening minimises the error on these inputs
    reference = logits(model, x)
    plain = pruned(model, "lowrank", None, rank=12, skip_if_larger=False)
    aware = pruned(model, "lowrank", calibration, rank=12, activation_aware=True, skip_if_larger=False)
    for out in (plain, aware):
        layers = block_linears(out)
        assert len(layers) == 14 and all(isinstance(m.encoding, LowRankTensor) for m in layers.values())
        assert all(m.encoding.rank == 12 for m in layers.values())
    assert error(aware, reference, x) < error(plain, reference, x)


def test_kmeans_runs_on_decoder_blocks():
    model = outlier_decoder()
    x = torch.cat([w["input_ids"] for w in windows(2, length=16, seed=4)])
    reference = logits(model, x)
    out = pruned(model, "kmeans", None, bits=4)
    layers = block_linears(out)
    assert len(layers) == 14 and all(isinstance(m.encoding, ClusteredTensor) for m in layers.values())
    for name, layer in layers.items():
        assert layer.encoding.decode(torch.float32).unique().numel() <= 16, name
    coarse = pruned(model, "kmeans", None, bits=2)
    assert error(out, reference, x) < error(coarse, reference, x)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_tied_output_layer_is_refused_not_untied(method):
    from modelpress.errors import ConfigError

    model = tiny_decoder(tied=True)
    with pytest.raises(ConfigError, match="shares its weight with 'model.embed_tokens'"):
        modelpress.compress(model, {"stages": [{"pass": method, "config": {"sparsity": 0.5},
                                                "targets": {"include": ["lm_head"]}}]}, calibration=windows(2))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = tiny_decoder(tied=False)
    modelpress.compress(untied, {"stages": [{"pass": method, "config": {"sparsity": 0.5},
                                             "targets": {"include": ["lm_head"]}}]}, calibration=windows(2))
    assert isinstance(untied.lm_head, CompressedLinear)
