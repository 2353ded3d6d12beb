"""The LLM presets on the real SmolLM2-135M-Instruct (the bundled GGUF, read once per session):
the tied embedding and output layer stay one 8-bit encoding, the weights fit Q4_0's file, and the
perplexity on held-out text stays close to fp32's. Few windows keep it short: the figures of the
presets (32 calibration windows, 8 scored) are in benchmarks/results_llm_presets.md."""

from __future__ import annotations

import copy

import pytest
import torch

import modelpress
from modelpress.calibration import calibration_windows
from modelpress.data.text import reference_text
from modelpress.encodings import QuantScheme
from modelpress.evaluate.perplexity import score_language_model, token_windows
from modelpress.nn.registry import is_compressed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_float):
    model, tokenizer = smollm2_float
    ids = torch.tensor(tokenizer(reference_text("heldout"))["input_ids"])
    windows = token_windows(ids, 512, 1024)
    return model, tokenizer, windows, score_language_model(model, windows)


def weight_bytes(model) -> int:
    encodings = {id(m.encoding): m.encoding for m in model.modules() if is_compressed(m)}
    return sum(e.nbytes for e in encodings.values()) + sum(p.numel() * p.element_size() for p in model.parameters())


def test_llm_q4_on_smollm2(smollm2):
    model, tokenizer, windows, fp32 = smollm2
    q4 = modelpress.compress(copy.deepcopy(model), "llm-q4", calibration=calibration_windows(tokenizer, 2))
    assert q4.lm_head.encoding is q4.model.embed_tokens.encoding
    assert q4.lm_head.encoding.scheme == QuantScheme(8, True, 32)  # Q8_0's grid
    assert q4.model.layers[7].mlp.down_proj.encoding.scheme == QuantScheme(4, True, 32)
    # the weights of llama.cpp's Q4_0 file of this model (Q4_0 blocks, Q8_0 table: 91.7 MB with its 1.8 MB vocabulary)
    assert weight_bytes(q4) < 90.0e6
    ratio = score_language_model(q4, windows).perplexity / fp32.perplexity
    # 2 calibration windows (the suite's time): 1.087 measured; the preset's figure (16 windows, 8 held out): 1.073
    assert ratio < 1.2, ratio
