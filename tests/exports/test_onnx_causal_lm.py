"""ONNX exports of causal LMs: symmetric 4-bit layers as ONNX Runtime's MatMulNBits on our packed codes (the
bytes reshaped, not repacked), run by ONNX Runtime with modelpress's logits and perplexity."""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch

from _tiny_lm import write_tiny_lm
from modelpress import RTNConfig, compress
from modelpress.evaluate.perplexity import score_language_model, token_windows
from modelpress.exports import export_model
from modelpress.exports.onnx import ONNX_FILE, onnx_bytes
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.checkpoint import save
from modelpress.formats.models import load_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
Q4 = RTNConfig(bits=4, symmetric=True, group_size=32)


def _recipe(prefix: str) -> dict:
    return {f"{prefix}.embed_tokens": RTNConfig(bits=8), f"{prefix}.layers.*": Q4}


class OrtLM:
    """An ONNX causal LM called as model(input_ids=...) -> logits, as score_language_model calls models."""

    def __init__(self, data):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        (logits,) = self.session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        return torch.from_numpy(logits)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    lm = compress(load_model(write_tiny_lm(request.param, root / "src")), _recipe("model.model"))
    folder = export_model(save(lm, root / "ckpt"), "onnx", root / "onnx")
    return lm, folder


def test_ort_logits_equal_modelpress(exported):
    lm, folder = exported
    ort_lm = OrtLM(str(folder / ONNX_FILE))
    for text in ("hello world, a longer prompt than the trace's", "x", "two words"):
        ids = torch.tensor([lm.tokenizer.encode(text)])
        with torch.no_grad():
            want = lm(ids).logits
        torch.testing.assert_close(ort_lm(ids), want, atol=1e-4, rtol=0)


def test_padded_batch_with_attention_mask(exported):
    lm, folder = exported
    batch = lm.tokenize(["a short one", "a much longer sentence than the first"])
    got = OrtLM(str(folder / ONNX_FILE))(batch["input_ids"], batch["attention_mask"])
    for row, mask in enumerate(batch["attention_mask"].bool()):
        with torch.no_grad():
            want = lm(batch["input_ids"][row:row + 1, mask]).logits[0]
        torch.testing.assert_close(got[row, mask], want, atol=1e-4, rtol=0)


def test_four_bit_layers_are_matmulnbits_on_our_codes(exported):
    lm, folder = exported
    model = onnx.load(str(folder / ONNX_FILE))
    from onnx import numpy_helper

    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    four_bit = {n: m.encoding for n, m in lm.model.named_modules()
                if hasattr(m, "encoding") and m.encoding.scheme.bits == 4}
    nodes = collections.Counter(n.op_type for n in model.graph.node)
    assert nodes["MatMulNBits"] == len(four_bit) > 0
    for name, enc in four_bit.items():
        rows, cols = enc.matrix_shape
        packed = arrays[f"model.{name}.packed"]
        assert packed.dtype == np.uint8 and packed.shape == (rows, cols // 32, 16)
        assert np.array_equal(packed.reshape(rows, -1), enc.codes.numpy())
        assert np.array_equal(arrays[f"model.{name}.scales"], enc.scale.float().reshape(-1).numpy())


def test_perplexity_equals_modelpress(exported):
    lm, folder = exported
    ids = torch.tensor(lm.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 12))
    windows = token_windows(ids, 64, max_tokens=256)
    with torch.no_grad():
        ours = score_language_model(lm, windows)
    theirs = score_language_model(OrtLM(str(folder / ONNX_FILE)), windows)
    assert abs(theirs.nll - ours.nll) <= 1e-4 * ours.nll
    assert torch.equal(theirs.predictions, ours.predictions)


@pytest.mark.slow
def test_smollm2_q4_perplexity_in_ort_within_half_a_percent(smollm2_float):
    """SmolLM2 with 4-bit symmetric groups of 32 (Q4_0's grid) in its blocks, 8-bit embeddings: ONNX Runtime's
    perplexity on two 512-token windows of heldout text within 0.5% of modelpress's."""
    from modelpress.data.text import reference_text

    model, tokenizer = smollm2_float
    lm = compress(CausalLM(copy.deepcopy(model), tokenizer, {}), _recipe("model.model"))
    windows = token_windows(torch.tensor(tokenizer(reference_text("heldout"))["input_ids"]), 512, max_tokens=1024)
    with torch.inference_mode():
        ours = score_language_model(lm, windows)
    theirs = score_language_model(OrtLM(onnx_bytes(lm)), windows)
    ppl_ours, ppl_theirs = np.exp(ours.nll), np.exp(theirs.nll)
    assert abs(ppl_theirs / ppl_ours - 1) <= 0.005, (ppl_ours, ppl_theirs)
