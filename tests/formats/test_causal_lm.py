"""Causal LMs through the whole product on tiny random models of every architecture of issue 14:
Hugging Face folder -> load_model -> compress (int8, int4) -> save -> load -> generate the same tokens.
Tied embeddings stay tied and are stored once; GPT-2's Conv1D layers arrive as nn.Linear."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from _tiny_lm import ARCHITECTURES, write_tiny_lm
from modelpress.compress import compress
from modelpress.errors import FormatError
from modelpress.formats import tensorfile
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.checkpoint import WEIGHTS, load, read_manifest, save
from modelpress.formats.models import is_causal_lm_source, load_model
from modelpress.nn import CompressedEmbedding, CompressedLinear
from modelpress.passes import RTNConfig
from modelpress.store import Store

TIED = {"llama": True, "qwen2": True, "mistral": False, "gpt2": True, "phi3": False}
PROMPT = "the store keeps"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-lms")
    return {arch: write_tiny_lm(arch, root / arch) for arch in ARCHITECTURES}


def _ids(lm: CausalLM) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode(PROMPT)], dtype=torch.long)  # (1, T)


def _greedy(lm: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    return lm.generate(ids, max_new_tokens=10, do_sample=False)


def _head_and_table(lm: CausalLM) -> tuple[nn.Module, nn.Module]:
    return lm.model.get_output_embeddings(), lm.model.get_input_embeddings()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folder_loads_as_transformers_loads_it(folders, arch):
    from transformers import AutoModelForCausalLM

    lm = load_model(folders[arch])
    reference = AutoModelForCausalLM.from_pretrained(folders[arch])
    ids = _ids(lm)
    assert isinstance(lm, CausalLM) and lm.source == folders[arch]
    assert torch.allclose(lm(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(_greedy(lm, ids), reference.generate(ids, attention_mask=torch.ones_like(ids),
                                                            max_new_tokens=10, do_sample=False))
    head, table = _head_and_table(lm)
    assert (head.weight is table.weight) == TIED[arch]
    assert lm.tokenizer.decode(lm.tokenizer.encode(PROMPT)) == PROMPT


def test_gpt2_conv1d_becomes_linear(folders):
    from transformers.pytorch_utils import Conv1D

    lm = load_model(folders["gpt2"])
    assert not any(isinstance(m, Conv1D) for m in lm.modules())
    attn = lm.model.transformer.h[0].attn.c_attn
    assert isinstance(attn, nn.Linear) and attn.weight.shape == (3 * 64, 64)


@pytest.mark.parametrize("preset", ["int8", "int4"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compress_save_load_generate(folders, tmp_path, arch, preset):
    lm = compress(load_model(folders[arch]), preset)
    ids = _ids(lm)
    before = _greedy(lm, ids)
    logits = lm(ids).logits
    save(lm, tmp_path / "ck")
    again = load(tmp_path / "ck")
    assert isinstance(again, CausalLM)
    assert torch.equal(_greedy(again, ids), before)
    assert torch.equal(again(ids).logits, logits)
    head, table = _head_and_table(again)
    assert isinstance(head, CompressedLinear) and isinstance(table, CompressedEmbedding)
    assert (head.encoding is table.encoding) == TIED[arch]
    assert not any(isinstance(m, nn.Linear) for m in again.modules())  # every Linear compressed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_weights_are_stored_once(folders, tmp_path, arch):
    lm = compress(load_model(folders[arch]), "int8")
    head_name = "model.lm_head"
    save(lm, tmp_path / "q")
    manifest = read_manifest(tmp_path / "q")
    names = tensorfile.parse(bytearray((tmp_path / "q" / WEIGHTS).read_bytes()), "weights")
    table_name = manifest["modules"][head_name]["tied_to"]
    assert table_name in ("model.model.embed_tokens", "model.transformer.wte")
    assert not any(k.startswith(head_name + ".") for k in names)
    assert any(k.startswith(table_name + ".weight::") for k in names)

    float_lm = load_model(folders[arch])  # uncompressed: one float tensor, tied again on load
    save(float_lm, tmp_path / "f")
    manifest = read_manifest(tmp_path / "f")
    assert manifest["tied"] == {f"{head_name}.weight": f"{table_name}.weight"}
    names = tensorfile.parse(bytearray((tmp_path / "f" / WEIGHTS).read_bytes()), "weights")
    assert f"{head_name}.weight" not in names
    head, table = _head_and_table(load(tmp_path / "f"))
    assert head.weight is table.weight


def test_a_pass_on_the_output_layer_quantises_the_tied_table(folders):
    lm = load_model(folders["llama"])
    table = lm.model.model.embed_tokens.weight.detach().clone()
    compress(lm, {"*lm_head": RTNConfig(bits=4, group_size=16)})
    head, emb = _head_and_table(lm)
    assert isinstance(emb, CompressedEmbedding) and emb.encoding is head.encoding
    ids = torch.tensor([[0, 5, 258]])
    decoded = head.encoding.decode(torch.float32)
    assert torch.equal(emb(ids), decoded[ids])  # the lookup reads the shared encoded table
    assert 0 < float((decoded - table).abs().max()) < float(table.abs().max())  # quantised, not replaced


def test_store_versions_keep_the_tie(folders, tmp_path):
    lm = compress(load_model(folders["qwen2"]), "int4")
    ids = _ids(lm)
    with Store.init(tmp_path / "store") as store:
        vid = store.put(lm, "tiny")
        names = [t.name for t in store.version("tiny", vid).tensors]
        again = store.load("tiny", vid)
    assert not any(n.startswith("model.lm_head.") for n in names)
    assert isinstance(again, CausalLM)
    assert torch.equal(_greedy(again, ids), _greedy(lm, ids))
    head, table = _head_and_table(again)
    assert head.encoding is table.encoding


def test_encoders_and_causal_lms_are_told_apart_by_config(folders, tmp_path):
    assert is_causal_lm_source(folders["llama"])
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert not is_causal_lm_source(encoder)
    (encoder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (encoder / "modules.json").write_text("[]")  # a sentence-transformers folder around a decoder
    assert not is_causal_lm_source(encoder)


def test_a_tampered_tie_is_refused(folders, tmp_path):
    lm = compress(load_model(folders["llama"]), "int8")
    save(lm, tmp_path / "ck")
    path = tmp_path / "ck" / "modelpress.json"
    manifest = json.loads(path.read_text())
    manifest["modules"]["model.lm_head"]["tied_to"] = "model.model.layers.0.mlp.up_proj"
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="tied"):
        load(tmp_path / "ck")


def test_a_pass_that_rebinds_the_output_weight_keeps_the_tie(folders):
    """GPTQ rebinds each layer's float weight while it calibrates (the embedding must keep its float values
    for the lookups meanwhile); the tie recorded when the model was built still makes one encoding of both."""
    from modelpress.passes import GPTQConfig

    lm = load_model(folders["llama"])
    sentences = [f"Sentence {i} says something about the weather and the {i}th day of the week." for i in range(8)]
    compress(lm, GPTQConfig(bits=4, group_size=16), calibration=sentences)
    head, table = _head_and_table(lm)
    assert isinstance(table, CompressedEmbedding) and table.encoding is head.encoding


def test_a_tampered_float_tie_is_refused(folders, tmp_path):
    save(load_model(folders["llama"]), tmp_path / "f")
    path = tmp_path / "f" / "modelpress.json"
    manifest = json.loads(path.read_text())
    manifest["tied"] = {"model.lm_head.weight": "model.model.norm.weight"}  # a (64,) vector for a (259, 64) table
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError):
        load(tmp_path / "f")
