"""ONNX exports of sentence encoders, run by ONNX Runtime: the same embeddings as modelpress's own model of
the same weights (cosine >= 0.9999 on every sentence, at batch and sequence sizes other than the trace's),
the int8 weights in the file equal to our codes, and W8A8 layers running on ORT's fused integer kernels."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from hostile._tiny_source import SENTENCES, write_tiny_source
from modelpress import DynamicInt8Config, LowRankConfig, RTNConfig, compress
from modelpress.errors import UnsupportedError
from modelpress.exports import export_model
from modelpress.exports.onnx import ONNX_FILE, onnx_bytes
from modelpress.formats.checkpoint import save
from modelpress.formats.models import load_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

MORE = ["compress the store", "the dog", "a small fast model runs in a folder and the cat sits on the mat",
        "hello", "weights of the model in a file", "it is the world of the cat and the dog"]
RECIPES = {
    "int8": "int8",
    "w8a8": "w8a8",
    "w8a8-smooth": "w8a8-smooth",
    "w8a8-token-preset": "w8a8-token",
    "w8a8-token": {"*.encoder.*": DynamicInt8Config(activations="token")},
    "w8a8-row": {"*.encoder.*": DynamicInt8Config(activations="row")},
    "w8a8-8bit-weights": {"*.encoder.*": DynamicInt8Config(weight_bits=8)},  # 7-bit activations (reduce_range)
    "w8a8-8bit-weights-token": {"*.encoder.*": DynamicInt8Config(weight_bits=8, activations="token")},
    "int4-g16": {"*.encoder.*": RTNConfig(bits=4, symmetric=False, group_size=16),
                 "*.embeddings.*": RTNConfig(bits=4, symmetric=False, group_size=32)},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_source(tmp_path_factory.mktemp("onnx") / "src")


def _session(data: bytes, optimized: str | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _run(session, encoder, sentences):
    batch = encoder.tokenize(sentences)
    states, pooled = session.run(None, {k: v.numpy() for k, v in batch.items()})
    return torch.from_numpy(states), torch.from_numpy(pooled), batch["attention_mask"].bool()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_ort_gives_modelpress_embeddings(source, recipe, tmp_path):
    encoder = compress(load_model(source), RECIPES[recipe], calibration=SENTENCES + MORE)
    folder = export_model(save(encoder, tmp_path / "ckpt"), "onnx", tmp_path / "onnx")
    session = _session(str(folder / ONNX_FILE))
    for sentences in (SENTENCES, MORE, MORE[:1]):  # other batch and sequence sizes than the trace
        _, got, _ = _run(session, encoder, sentences)
        want = encoder.encode(sentences, batch_size=len(sentences))
        cos = torch.nn.functional.cosine_similarity(got, want)
        assert cos.min() >= 0.9999, (recipe, cos)
    states, _, mask = _run(session, encoder, MORE)
    with torch.no_grad():
        want_states = encoder.model(**encoder.tokenize(MORE)).last_hidden_state
    assert torch.nn.functional.cosine_similarity(states[mask], want_states[mask]).min() >= 0.9999
    assert {"tokenizer.json", "config.json", "modules.json"} <= {p.name for p in folder.iterdir()}


def _initializers(data: bytes) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(data).graph.initializer}


def test_w8a8_weights_are_our_codes_and_run_on_fused_integer_kernels(source, tmp_path):
    encoder = compress(load_model(source), "w8a8-smooth", calibration=SENTENCES + MORE)
    linears = {n: m for n, m in encoder.model.named_modules()  # BERT's pooler is not in the graph (unused)
               if type(m).__name__ == "CompressedLinear" and not n.startswith("pooler")}
    codes = {n: m.encoding for n, m in linears.items()}
    data = onnx_bytes(encoder)
    arrays = _initializers(data)
    for name, enc in codes.items():
        inner = getattr(enc, "inner", enc)
        want = (inner.int_codes().to(torch.int16) - inner.scheme.midpoint).to(torch.int8).t().numpy()
        got = arrays[f"model.{name}.w_t"]
        assert got.dtype == np.int8 and np.array_equal(got, want)
        np.testing.assert_array_equal(arrays[f"model.{name}.w_scale"], inner.scale.float().reshape(-1).numpy())
    ops = collections.Counter(n.op_type for n in onnx.load_from_string(data).graph.node)
    assert ops["MatMulInteger"] == ops["DynamicQuantizeLinear"] == len(linears)
    assert ops["MatMul"] == 2 * 2  # attention scores and values, per layer: the only float matmuls
    optimized = str(tmp_path / "optimized.onnx")
    _session(data, optimized)
    fused = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == len(linears)
    assert fused["MatMulInteger"] == 0


def test_weight_only_layers_keep_their_codes_in_the_file(source):
    encoder = compress(load_model(source), "int8")
    arrays = _initializers(onnx_bytes(encoder))
    floats = sum(a.nbytes for a in arrays.values() if a.dtype == np.float32)
    codes = sum(a.nbytes for a in arrays.values() if a.dtype == np.uint8)
    assert codes > 3 * floats  # the matrices are stored as 8-bit codes (floats: scales, biases, norms)


def test_what_onnx_cannot_hold_is_refused(source):
    with pytest.raises(UnsupportedError, match="holds a lowrank weight"):
        onnx_bytes(compress(load_model(source), {"*.encoder.*": LowRankConfig(rank=4)}))


def test_cli_exports_onnx(source, tmp_path, capsys):
    from modelpress.cli import main

    ckpt = save(compress(load_model(source), "w8a8"), tmp_path / "ckpt")
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "onnx" / ONNX_FILE).is_file()
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 2  # never replaced
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_w8a8_token_export_is_close_to_modelpress_in_onnx_runtime(minilm):
    """MiniLM, preset w8a8-token, exported and run by ONNX Runtime on held-out sentences. Every W8A8 layer is
    bit-exact (test_onnx_ops), and a good share of sentences come out to float rounding; the float layers between
    them (LayerNorm, GELU, softmax, attention products) are ORT's own, whose last-bit differences can move an
    activation code, and a W8A8 encoder amplifies that. Measured: mean cosine 0.99981 on 2000 held-out
    sentences, short of issue 15's 0.9999 (w8a8-smooth's per-call export: 0.9983). Fidelity to fp32 beyond
    ORT's own per-channel dynamic int8 (0.9929, benchmarks/results_onnx.md)."""
    import copy

    from modelpress.data.corpus import corpus_splits
    from modelpress.formats.st_encode import encode_sentences

    sentences = list(corpus_splits(n_eval=128, n_calib=1).evaluation)
    reference = minilm.encode(sentences)
    model = compress(copy.deepcopy(minilm), "w8a8-token")
    want = model.encode(sentences)
    session = _session(onnx_bytes(model))

    def forward(input_ids, attention_mask, token_type_ids):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "token_type_ids": token_type_ids.numpy()}
        return torch.from_numpy(session.run(["sentence_embedding"], feeds)[0])

    got = encode_sentences(model, forward, sentences, 32)
    cos = torch.nn.functional.cosine_similarity(got, want)
    exact = float((cos > 0.999999).float().mean())  # no activation code moved (the pooling's last bits may)
    assert cos.mean() >= 0.9997 and cos.min() >= 0.998 and exact >= 0.2, (float(cos.mean()), cos.min(), exact)
    assert torch.nn.functional.cosine_similarity(got, reference).mean() >= 0.995
