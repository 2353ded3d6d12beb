"""Hugging Face folder exports, loaded by the readers users have: transformers' AutoModelForCausalLM and
sentence-transformers' SentenceTransformer. Weights are the decoded encodings (float32: exactly; float16 /
bfloat16: as rounded), so outputs match modelpress's model within the dtype's rounding."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_lm import write_tiny_lm
from hostile._tiny_source import SENTENCES, write_tiny_source
from modelpress import RTNConfig, compress
from modelpress.errors import ConfigError, OutputExistsError, UnsupportedError
from modelpress.exports import export_model
from modelpress.exports.hf import EXPORT_KEY, hf_files
from modelpress.formats.checkpoint import save
from modelpress.formats.models import load_model

transformers = pytest.importorskip("transformers")
Q4 = RTNConfig(bits=4, symmetric=True, group_size=32)
LAYERS = {"llama": "model.model.layers.*", "gpt2": "model.transformer.h.*", "mistral": "model.model.layers.*"}


@pytest.fixture(scope="module", params=sorted(LAYERS))
def lm_checkpoint(request, tmp_path_factory):
    """(compressed tiny LM, its checkpoint folder): 4-bit groups in every block, float embedding and output."""
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    lm = compress(load_model(write_tiny_lm(request.param, root / "source")), {LAYERS[request.param]: Q4})
    return lm, save(lm, root / "q4")


def _ids(lm) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode("hello world, a test of the exported folder")])


def _rounded_reference(lm, dtype: torch.dtype) -> torch.Tensor:
    """modelpress's logits with every weight rounded to `dtype` (computed in float32): what the export holds."""
    from modelpress.exports.hf import _fit
    from modelpress.exports.hf_folder import dense_state

    model = transformers.AutoModelForCausalLM.from_config(lm.model.config)
    state = {k: v.to(dtype).float() for k, v in dense_state(lm.model, torch.float32).items()}
    model.load_state_dict(_fit(state, model), strict=False)
    model.tie_weights()
    with torch.no_grad():
        return model.eval()(input_ids=_ids(lm)).logits


def test_float32_export_gives_modelpress_logits(lm_checkpoint, tmp_path):
    lm, folder = lm_checkpoint
    out = export_model(folder, "hf", tmp_path / "hf", dtype="float32")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids(lm)).logits, lm(_ids(lm)).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_export_matches_within_rounding(lm_checkpoint, tmp_path, dtype):
    lm, folder = lm_checkpoint
    out = export_model(folder, "hf", tmp_path / "hf", dtype=dtype)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == getattr(torch, dtype)
    with torch.no_grad():
        got = loaded.float()(input_ids=_ids(lm)).logits
        want = lm(_ids(lm)).logits
    torch.testing.assert_close(got, _rounded_reference(lm, getattr(torch, dtype)), atol=1e-4, rtol=0)
    step = {"float16": 2**-10, "bfloat16": 2**-7}[dtype]  # relative rounding of one weight
    assert (got - want).abs().max() <= 8 * step * want.abs().max()
    assert (got[0].argmax(-1) == want[0].argmax(-1)).float().mean() >= 0.9  # near-ties of a random model may flip


def test_config_records_each_tensors_encoding(lm_checkpoint, tmp_path):
    lm, folder = lm_checkpoint
    out = export_model(folder, "hf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    record = config[EXPORT_KEY]
    assert "quantization_config" not in config and config["dtype"] == "float16"
    compressed = {f"{n.removeprefix('model.')}.weight" for n, m in lm.named_modules() if hasattr(m, "encoding")}
    assert set(record["tensors"]) == compressed and compressed
    for entry in record["tensors"].values():
        assert entry == {"kind": "quantized", "shape": entry["shape"], "bits": 4, "symmetric": True, "group_size": 32}
    assert record["recipe"]["stages"][0]["pass"] == "rtn"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]


def test_tied_output_layer_stored_once(tmp_path):
    from safetensors import safe_open

    lm = compress(load_model(write_tiny_lm("llama", tmp_path / "src")), "llm-int8")
    out = export_model(save(lm, tmp_path / "ckpt"), "hf", tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_sentence_transformer_loads_the_exported_encoder(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    encoder = compress(load_model(write_tiny_source(tmp_path / "src")), "int8")
    out = export_model(save(encoder, tmp_path / "ckpt"), "hf", tmp_path / "hf", dtype="float32")
    theirs = st.SentenceTransformer(str(out), device="cpu")
    torch.testing.assert_close(theirs.encode(SENTENCES, convert_to_tensor=True),
                               encoder.encode(SENTENCES, convert_to_tensor=True), atol=1e-5, rtol=0)
    half = export_model(tmp_path / "ckpt", "hf", tmp_path / "hf16")
    cos = torch.nn.functional.cosine_similarity(
        st.SentenceTransformer(str(half), device="cpu").encode(SENTENCES, convert_to_tensor=True).float(),
        encoder.encode(SENTENCES, convert_to_tensor=True))
    assert cos.min() > 0.9999


def test_refusals(lm_checkpoint, tmp_path, tiny_net):
    lm, folder = lm_checkpoint
    with pytest.raises(ConfigError, match="dtype"):
        export_model(folder, "hf", tmp_path / "a", dtype="int8")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(folder, "tflite", tmp_path / "a")
    with pytest.raises(UnsupportedError, match="no Hugging Face form"):
        hf_files(tiny_net)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        export_model(folder, "hf", tmp_path / "exists")


def test_shapes_the_config_cannot_hold_are_refused(tmp_path):
    lm = load_model(write_tiny_lm("llama", tmp_path / "src"))
    mlp = lm.model.model.layers[0].mlp
    keep = slice(0, 96)  # layer 0's FFN narrowed, layer 1's not: no intermediate_size describes both
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, torch.nn.Linear(64, 96, bias=False))
        getattr(mlp, name).weight.data = old.weight.data[keep].clone()
    mlp.down_proj = torch.nn.Linear(96, 64, bias=False)
    with pytest.raises(UnsupportedError, match="structured pruning"):
        hf_files(lm)
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_minilm_int8_float16_folder_in_sentence_transformers(minilm, tmp_path):
    """The bundled MiniLM at int8 exported as a float16 folder: SentenceTransformer's embeddings of held-out
    sentences match modelpress's own (cosine >= 0.9999 on every sentence)."""
    import copy

    st = pytest.importorskip("sentence_transformers")
    from modelpress.data.corpus import corpus_splits

    encoder = compress(copy.deepcopy(minilm), "int8")
    out = export_model(save(encoder, tmp_path / "ckpt"), "hf", tmp_path / "hf")
    sentences = list(corpus_splits(n_eval=200, n_calib=1).evaluation)
    theirs = st.SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True).float()
    cos = torch.nn.functional.cosine_similarity(theirs, encoder.encode(sentences, convert_to_tensor=True))
    assert cos.min() >= 0.9999
