"""W8A8 on Llama-family decoders (tiny random models with LLM-like activation outliers): SmoothQuant
scales fold into the RMSNorms and up_proj's rows (no input multiply left but o_proj's under
grouped-query attention), smoothing and a range per token each bring the logits closer to the float
model's than plain per-call W8A8 does, and a one-token call of the per-token kernel is fbgemm's
per-call product (the token's range is the call's)."""

from __future__ import annotations

import copy

import pytest
import torch

import modelpress
from modelpress.encodings import RangeSearch, quantize_weight
from modelpress.encodings.quantized import PER_CHANNEL, QuantScheme
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.nn import CompressedLinear, Kernel
from modelpress.passes.quantize import DynamicInt8Config

transformers = pytest.importorskip("transformers")

from _tiny_decoders import logits, tiny_decoder, windows  # noqa: E402


def outlier_decoder(kv_heads: int = 2):
    """Hidden channels 6-10x larger after some RMSNorm weights, and SwiGLU neurons whose output (down_proj's
    input) is 30x larger, with down_proj's columns 30x smaller so that the function is the same."""
    model = tiny_decoder("llama", heads=4, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("layernorm"):
                channels = torch.randperm(64, generator=g)[:4]
                module.weight[channels] *= torch.rand(4, generator=g) * 4 + 6
            if name.endswith(".mlp"):
                neurons = torch.randperm(128, generator=g)[:4]
                module.up_proj.weight[neurons] *= 30
                module.down_proj.weight[:, neurons] /= 30
    return model


def w8a8(model, calibration=None, **config):
    return modelpress.compress(copy.deepcopy(model), {"model.layers.*": DynamicInt8Config(**config)},
                               calibration=calibration)


def error(model, reference, x) -> float:
    return float((logits(model, x) - reference).pow(2).mean())


def test_smoothing_folds_into_norms_and_up_rows_and_leaves_only_gqa_o_proj_with_a_multiply():
    model = outlier_decoder(kv_heads=2)
    out = w8a8(model, windows(4), smooth_alpha=0.5, activations="token")
    scaled = {n for n, m in out.named_modules()
              if isinstance(m, CompressedLinear) and isinstance(m.encoding, ChannelScaledTensor)}
    assert scaled == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    for name, m in model.named_modules():  # the norms absorbed their scales
        if name.endswith("layernorm"):
            assert not torch.equal(m.weight, out.get_submodule(name).weight)
    no_gqa = w8a8(outlier_decoder(kv_heads=4), windows(4), smooth_alpha=0.5)
    assert not any(isinstance(m, CompressedLinear) and isinstance(m.encoding, ChannelScaledTensor)
                   for m in no_gqa.modules())


def test_smoothing_and_a_range_per_token_each_beat_plain_w8a8_on_outliers():
    model = outlier_decoder()
    calibration = windows(8, length=32)
    x = torch.cat([w["input_ids"] for w in windows(4, length=32, seed=11)])
    reference = logits(model, x)
    plain = error(w8a8(model), reference, x)
    token = error(w8a8(model, activations="token"), reference, x)
    smooth = error(w8a8(model, calibration, smooth_alpha=0.5), reference, x)
    both = error(w8a8(model, calibration, smooth_alpha=0.5, activations="token"), reference, x)
    assert token < plain and smooth < plain and both < plain, (plain, token, smooth, both)


@pytest.mark.parametrize("bias", [False, True])
def test_one_token_of_the_per_token_kernel_is_the_per_call_product(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    enc = quantize_weight(w, QuantScheme(8, True, PER_CHANNEL), RangeSearch.MINMAX, 63)
    token = CompressedLinear(enc, b, Kernel.DYNAMIC_INT8_TOKEN)
    call = CompressedLinear(enc, b, Kernel.DYNAMIC_INT8)
    x = torch.randn(5, 80, generator=g) * torch.linspace(0.1, 8, 5)[:, None]
    x[2, 7] = 300.0  # one huge activation in one token
    many = token(x)
    for i in range(5):
        one = token(x[i:i + 1])
        torch.testing.assert_close(one, call(x[i:i + 1]))
        step = float(x[i].max() - x[i].min().clamp_max(0)) / 255 * float(w.abs().sum(1).max())
        assert float((one - many[i:i + 1]).abs().max()) <= step  # at most one activation step apart
    assert token(x[None, 2:3]).shape == (1, 1, 48)  # (batch, tokens, features) with one token


def test_the_llm_w8a8_preset_on_a_tied_decoder():
    from modelpress.presets import preset

    model = outlier_decoder()
    x = torch.cat([w["input_ids"] for w in windows(4, length=32, seed=11)])
    reference = logits(model, x)
    out = modelpress.compress(copy.deepcopy(model), preset("llm-w8a8"), calibration=windows(8, length=32))
    emb, head = out.model.embed_tokens, out.lm_head
    assert emb.encoding is head.encoding  # the tied weight stays one int8 encoding
    assert emb.encoding.scheme == QuantScheme(8, True, PER_CHANNEL)
    blocks = {n: m for n, m in out.named_modules() if n.startswith("model.layers.") and isinstance(m, CompressedLinear)}
    assert len(blocks) == 14
    assert all(m.kernel in (Kernel.DYNAMIC_INT8, Kernel.DYNAMIC_INT8_TOKEN) for m in blocks.values())
    assert error(out, reference, x) < error(w8a8(model), reference, x)
