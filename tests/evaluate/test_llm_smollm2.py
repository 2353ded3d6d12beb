"""The real SmolLM2-135M-Instruct (the bundled GGUF, read once per session: conftest.smollm2_float): the lean generation loop
gives transformers' own tokens (and the answer), and the evaluation of the model against itself
agrees everywhere, with a perplexity equal to transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch

from modelpress.data.text import reference_text
from modelpress.evaluate.llm import evaluate_causal_lm
from modelpress.evaluate.perplexity import token_windows
from modelpress.nn.generation import Engine, greedy_generate

pytestmark = pytest.mark.slow


def test_smollm2_generation_and_evaluation(smollm2_float):
    model, tokenizer = smollm2_float
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    prompt = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    expected = model.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                              max_new_tokens=12, do_sample=False)[0, prompt.numel():].tolist()  # ends at <|im_end|>
    lean = greedy_generate(model, prompt, 12, stop={tokenizer.eos_token_id}, engine=Engine.LEAN)
    assert lean.engine is Engine.LEAN and list(lean.tokens) == expected
    assert "Paris" in tokenizer.decode(list(lean.tokens)) and lean.tokens[-1] == tokenizer.eos_token_id

    result = evaluate_causal_lm(model, model, tokenizer, windows=1, window=256, prompts=["What is 2 + 3?"],
                                new_tokens=8, measure_speed=False, name="smollm2")
    ids = torch.tensor(tokenizer.encode(reference_text("heldout"), add_special_tokens=False))
    window = token_windows(ids, 256, 256)
    with torch.inference_mode():
        loss = float(model(input_ids=window, labels=window).loss)
    assert result.reference.score.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.perplexity_ratio == 1.0 and result.top1_agreement == 1.0
    assert result.generation.identical == 1
    # tied embeddings: the 49152 x 576 table is held once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = sum(p.numel() for p in model.parameters())
    assert result.reference.size.params == params
    assert result.reference.resident_bytes < 4 * params + 4 * 576 * 49152 // 2
