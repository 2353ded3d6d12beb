"""QMATMUL inside decoder LMs: a tiny Llama generates the same greedy tokens on the packed-code kernel
as on decoded weights, holds no float copy of its quantised Linear weights, and (slow) SmolLM2's
perplexity on the packed codes equals decode-then-matmul's."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modelpress import compress
from modelpress.nn import CompressedLinear, Kernel, qmatmul
from modelpress.passes.config import WeightQuant
from modelpress.passes.quantize import RTNConfig

native_only = pytest.mark.skipif(not qmatmul.NATIVE_AVAILABLE, reason="the C extension is not built here")

QUANT = {"int8": WeightQuant(bits=8, symmetric=True, group_size="channel"),
         "q4-g32": WeightQuant(bits=4, symmetric=True, group_size=32),
         "q3-g64": WeightQuant(bits=3, symmetric=False, group_size=64)}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def linears(model) -> list[CompressedLinear]:
    return [m for m in model.modules() if isinstance(m, CompressedLinear)]


def float_bytes_held_by_kernels(model) -> int:
    """Bytes of float32 weight-sized tensors the prepared kernels of the quantised layers keep."""
    total = 0
    for layer in linears(model):
        for run in layer._runs.values():
            for cell in run.__closure__ or ():
                held = cell.cell_contents
                for t in held if isinstance(held, tuple) else (held,):
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= layer.in_features * 2:
                        total += t.numel() * 4
    return total


@native_only
@pytest.mark.parametrize("quant", QUANT.values(), ids=QUANT.keys())
def test_tiny_llama_generates_the_same_tokens_on_packed_codes(quant):
    model = tiny_llama()
    compress(model, {"model.layers.*": RTNConfig(quant=quant)})
    assert linears(model) and all(m.kernel is Kernel.AUTO for m in linears(model))
    prompt = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 11, 200]])
    with torch.inference_mode():
        packed = model.generate(prompt, max_new_tokens=12, do_sample=False)  # prefill 12 rows, then 1-row steps
        logits = model(packed).logits
    assert {m.resolved_kernel for m in linears(model)} == {Kernel.QMATMUL}
    assert float_bytes_held_by_kernels(model) == 0
    for m in linears(model):
        m.kernel = Kernel.DENSE
        m.release()
    with torch.inference_mode():
        dense = model.generate(prompt, max_new_tokens=12, do_sample=False)
        torch.testing.assert_close(model(packed).logits, logits, rtol=0, atol=1e-4)
    assert torch.equal(packed, dense)


@pytest.mark.slow
@native_only
def test_smollm2_perplexity_on_packed_codes_equals_decode_then_matmul(smollm2_float):
    """The bundled SmolLM2 (4-bit symmetric g32, Q4_0's grid): one 512-token window of heldout text and a
    decode step, on the packed codes and on decoded weights."""
    from modelpress.data.text import reference_text
    from modelpress.evaluate.perplexity import score_language_model, token_windows

    model, tokenizer = copy.deepcopy(smollm2_float[0]), smollm2_float[1]
    compress(model, {"model.layers.*": RTNConfig(quant=QUANT["q4-g32"])})
    ids = torch.tensor(tokenizer(reference_text("heldout"))["input_ids"])
    windows = token_windows(ids, 512, max_tokens=512)
    with torch.inference_mode():
        packed = score_language_model(model, windows)
        step = model(windows[:, :1]).logits  # one row per Linear: the fused decode kernel
    assert float_bytes_held_by_kernels(model) == 0
    for m in linears(model):
        m.kernel = Kernel.DENSE
        m.release()
    with torch.inference_mode():
        dense = score_language_model(model, windows)
        dense_step = model(windows[:, :1]).logits
    assert abs(packed.nll - dense.nll) <= 1e-5 * dense.nll
    assert torch.equal(packed.predictions, dense.predictions)
    torch.testing.assert_close(step, dense_step, rtol=0, atol=1e-3)
