"""K-quants (Q4_K, Q6_K) in a GGUF export, per tensor beside Q4_0 in one file: a tiny Llama whose down_proj rows
are 256 wide (one K-quant block) and every other row 64 wide. The written blocks decode (by us and by the gguf
package, bit for bit) to what each record says, a K-quant asked for on rows that are not whole 256-blocks falls
back as llama.cpp's quantiser does and says so, our import keeps the Q4_0 codes and dequantises the K-quants
(saying so), and llama.cpp (where llama-cpp-python is installed) runs the file to the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_lm import write_tiny_lm
from modelpress import RTNConfig, compress, export, provenance
from modelpress.errors import ConfigError
from modelpress.formats import gguf_blocks as gb
from modelpress.formats.gguf import load_gguf
from modelpress.formats.gguf_llama import gguf_name
from modelpress.formats.models import load_model

IDS = [1, 40, 99, 7, 200, 31, 2, 17, 64, 5]
MIXED = {"blk.*.ffn_down.weight": "Q6_K", "blk.1.ffn_down.weight": "Q4_K"}  # the last matching pattern wins


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    """The tiny Llama (intermediate size 256; a tokenizer with a merge, which llama.cpp needs) with 4-bit symmetric
    g32 weights everywhere (Q4_0's grid)."""
    folder = write_tiny_lm("llama", tmp_path_factory.mktemp("wide") / "llama", merge=True, intermediate_size=256)
    lm = load_model(folder)
    compress(lm, RTNConfig(bits=4, group_size=32))
    return lm


@pytest.fixture(scope="module")
def mixed(q4, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "m.gguf"
    return export(q4, "gguf", path, types=MIXED), path


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def test_each_tensor_gets_its_own_type_in_one_file(q4, mixed):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    result, path = mixed
    tensors = _tensors(path)
    kinds = {t.name: t.ggml_type for t in result.tensors}
    assert (kinds["blk.0.ffn_down.weight"], kinds["blk.1.ffn_down.weight"]) == ("Q6_K", "Q4_K")
    assert {k for n, k in kinds.items() if "ffn_down" not in n and "norm" not in n} == {"Q4_0"}
    assert {r.how for r in result.tensors if r.ggml_type in ("Q4_K", "Q6_K")} == {"requantised"}
    assert {r.how for r in result.tensors if r.ggml_type == "Q4_0"} == {"exact"}
    assert not result.fallbacks
    for record in result.tensors:
        t = tensors[record.name]
        assert t.tensor_type.name == record.ggml_type
        if record.ggml_type in ("Q4_K", "Q6_K"):
            kind = int(t.tensor_type)
            blocks = np.asarray(t.data).reshape(-1, gb.BYTES[kind])
            ours, theirs = gb.dequantise(blocks, kind), dequantize(blocks, GGMLQuantizationType(kind))
            assert np.array_equal(ours.reshape(-1).view(np.uint32), theirs.reshape(-1).view(np.uint32))
            layer = q4.model.model.layers[int(record.name.split(".")[1])].mlp.down_proj
            model = layer.encoding.decode(torch.float32).numpy()
            change = float(np.abs(ours.reshape(model.shape) - model).max())
            assert record.max_abs_change == change and 0 < change <= layer.encoding.scale.float().max().item()


def test_our_import_keeps_q4_0_and_dequantises_k_quants_saying_so(q4, mixed):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    result, path = mixed
    back = load_gguf(path, keep_blocks=True)
    tensors = _tensors(path)
    for name, module in back.named_modules():
        if not name.endswith("_proj"):
            continue
        record_name = gguf_name(name.removeprefix("model.") + ".weight")
        if name.endswith("down_proj"):
            assert getattr(module, "encoding", None) is None  # float32: the file's weights, dequantised by gguf
            t = tensors[record_name]
            want = dequantize(np.asarray(t.data), GGMLQuantizationType(int(t.tensor_type))).reshape(module.weight.shape)
            assert np.array_equal(module.weight.detach().numpy(), want)
        else:
            mine = q4.get_submodule(name).encoding
            assert torch.equal(module.encoding.codes, mine.codes) and torch.equal(module.encoding.scale, mine.scale)
    log = "\n".join(provenance(back).log)
    assert "1 x Q4_K dequantised to float32" in log and "1 x Q6_K dequantised to float32" in log
    assert "x Q4_0 kept as int4 sym g32" in log
    ids = torch.tensor([IDS])  # the same model but for the two requantised layers
    assert torch.nn.functional.cosine_similarity(back(ids).logits[0], q4(ids).logits[0], dim=1).min() > 0.99


def test_k_quants_on_rows_that_are_not_whole_blocks_fall_back_as_llama_cpp_does(q4, tmp_path):
    result = export(q4, "gguf", tmp_path / "k.gguf", types={"*": "Q4_K"})
    kinds = {t.name: t for t in result.tensors}
    assert kinds["blk.0.ffn_down.weight"].ggml_type == "Q4_K" and not kinds["blk.0.ffn_down.weight"].fallback
    up = kinds["blk.0.ffn_up.weight"]
    assert up.ggml_type == "Q5_0" and up.how == "requantised"
    assert up.fallback.startswith("Q4_K asked: rows of 64 are not whole 256-weight blocks, Q5_0 instead")
    assert len(result.fallbacks) == 2 * 6 + 1  # q, k, v, o, gate, up per block; the table
    assert "Q4_K asked" in result.summary()
    assert int(_tensors(tmp_path / "k.gguf")["blk.1.attn_q.weight"].tensor_type) == gb.Q5_0
    q6 = export(q4, "gguf", tmp_path / "k6.gguf", types={"blk.*.attn_v.weight": "Q6_K"})
    assert {t.ggml_type for t in q6.fallbacks} == {"Q8_0"}
    with pytest.raises(ConfigError, match="no GGUF block type holds"):
        export(q4, "gguf", tmp_path / "x.gguf", types={"*": "Q4_K"}, exact=True)


def test_llama_cpp_runs_the_mixed_file(q4, mixed):
    """Where llama-cpp-python is installed (the bench-llm extra; not in CI's dev install): llama.cpp loads the file
    with its per-tensor types and its logits follow our import's of the same file (llama.cpp rounds activations
    to 8 bits per block for its quantised dot products: close, not equal)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    result, path = mixed
    llm = llama_cpp.Llama(str(path), n_ctx=32, n_batch=32, logits_all=True, n_threads=1, verbose=False)
    llm.eval(IDS)
    theirs = torch.tensor(np.asarray(llm.scores[: len(IDS)]), dtype=torch.float32)
    ours = load_gguf(path)(torch.tensor([IDS])).logits[0]
    cosine = torch.nn.functional.cosine_similarity(theirs, ours, dim=1)
    assert cosine.min() > 0.995, cosine
    assert (theirs.argmax(1) == ours.argmax(1)).float().mean() >= 0.8
