"""The bundled SmolLM2-135M-Instruct (a Q4_1 GGUF file) end to end: `smollm2` loads as a CausalLM that
answers, int8 keeps the tied embedding/output layer as one encoding stored once, and the checkpoint
generates the same tokens after a reload."""

from __future__ import annotations

import pytest
import torch

from modelpress.compress import compress
from modelpress.formats import tensorfile
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.checkpoint import WEIGHTS, load, read_manifest, save
from modelpress.formats.models import load_model

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_ids(lm: CausalLM) -> torch.Tensor:
    text = lm.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)  # (1, T)


def _answer(lm: CausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    out = lm.generate(ids, max_new_tokens=12, do_sample=False)
    return out, lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_smollm2_int8_round_trip(tmp_path):
    lm = load_model("smollm2")
    assert isinstance(lm, CausalLM) and lm.model.config.num_hidden_layers == 30
    ids = _chat_ids(lm)
    assert "Paris" in _answer(lm, ids)[1]

    compress(lm, "int8")
    head, table = lm.model.lm_head, lm.model.model.embed_tokens
    assert head.encoding is table.encoding  # one tensor, quantised once
    before, answer = _answer(lm, ids)
    assert "Paris" in answer
    save(lm, tmp_path / "q")
    names = tensorfile.parse(bytearray((tmp_path / "q" / WEIGHTS).read_bytes()), "weights")
    assert not any(k.startswith("model.lm_head.") for k in names)
    assert read_manifest(tmp_path / "q")["modules"]["model.lm_head"]["tied_to"] == "model.model.embed_tokens"
    # 134.5M parameters at 8 bits plus per-row scales, the tied table once: well under fp32's 538 MB / 3.5
    assert (tmp_path / "q" / WEIGHTS).stat().st_size < 538e6 / 3.5

    again = load(tmp_path / "q")
    assert torch.equal(_answer(again, ids)[0], before)
    assert again.model.lm_head.encoding is again.model.model.embed_tokens.encoding


def test_our_gguf_reader_gives_the_model_transformers_reads():
    """SmolLM2's Q4_1 and Q8_0 blocks, q/k row order and metadata, read by us (seconds) and by transformers'
    GGUF reader (tens of seconds): the same weights, config and generation config."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from modelpress.formats.models import resolve_source

    ours = load_model("smollm2").model
    path = resolve_source("smollm2")
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    skip = {"quantization_config", "_name_or_path", "architectures"}
    ca, cb = ours.config.to_dict(), theirs.config.to_dict()
    # ours also keeps llama.cpp's pre-tokenizer name (a GGUF export writes it back); transformers drops it
    assert ca.pop("gguf_tokenizer_pre") == GGUFReader(path).fields["tokenizer.ggml.pre"].contents()
    assert {k: v for k, v in ca.items() if k not in skip} == {k: v for k, v in cb.items() if k not in skip}
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
