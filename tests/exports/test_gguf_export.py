"""GGUF export of a tiny Llama: grids that are block types go in with their codes and scales unchanged (read
back by the gguf package's own reader, and by our import with blocks kept), other weights are requantised
and listed, the metadata is what llama.cpp reads, and what a GGUF cannot hold is one clear error."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from _tiny_lm import write_tiny_lm
from modelpress import RTNConfig, compress, export, preset
from modelpress.cli import main
from modelpress.errors import ConfigError, FormatError, OutputExistsError, UnsupportedError
from modelpress.exports.gguf_tensors import export_tensor
from modelpress.formats import gguf_blocks as gb
from modelpress.formats.checkpoint import save
from modelpress.formats.gguf import check_gguf, load_gguf
from modelpress.formats.gguf_llama import gguf_name, permute_rows
from modelpress.formats.models import load_model

IDS = torch.tensor([[1, 40, 99, 7, 200, 31, 2]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_lm(arch, root / arch) for arch in ("llama", "qwen2")}


def _compressed(folder, config):
    lm = load_model(folder["llama"])
    compress(lm, config)
    return lm


def _encodings(lm):
    return {name: m.encoding for name, m in lm.named_modules() if getattr(m, "encoding", None) is not None}


def _read(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _order(name: str, lm):
    cfg = lm.model.config
    if ".attn_q." in name:
        return permute_rows(cfg.num_attention_heads * 16, cfg.num_attention_heads)
    if ".attn_k." in name:
        return permute_rows(cfg.num_key_value_heads * 16, cfg.num_key_value_heads)
    return slice(None)


@pytest.mark.parametrize("bits, kind", [(4, gb.Q4_0), (8, gb.Q8_0)])
def test_symmetric_g32_round_trip_is_exact(folders, tmp_path, bits, kind):
    lm = _compressed(folders, RTNConfig(bits=bits, group_size=32))  # Linear and Embedding layers
    result = export(lm, "gguf", tmp_path / "m.gguf")
    assert {t.how for t in result.tensors if t.ggml_type != "F32"} == {"exact"}
    assert all(t.max_abs_change == 0 for t in result.tensors)
    reader, tensors = _read(tmp_path / "m.gguf")
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    unpack = gb.unpack_q4_0 if kind == gb.Q4_0 else gb.unpack_q8_0
    encodings = _encodings(lm)
    for name, enc in encodings.items():
        if name == "model.lm_head":
            continue
        t = tensors[gguf_name(name.removeprefix("model.") + ".weight")]
        assert int(t.tensor_type) == kind
        q, d = unpack(np.asarray(t.data).reshape(-1, gb.BYTES[kind]))
        rows = _order(t.name, lm)
        codes = enc.int_codes().numpy()[rows].reshape(-1, 32)
        want = codes if bits == 4 else (codes.astype(np.int16) - 128).astype(np.int8)
        assert np.array_equal(q, want) and np.array_equal(d, enc.scale.numpy()[rows].reshape(-1))
    back = load_gguf(tmp_path / "m.gguf", keep_blocks=True)  # our import: the same encodings
    imported = _encodings(back)
    assert imported.keys() == encodings.keys()
    for name, enc in encodings.items():
        assert torch.equal(imported[name].codes, enc.codes) and torch.equal(imported[name].scale, enc.scale)
        assert imported[name].scheme == enc.scheme
    assert back.model.lm_head.encoding is back.model.model.embed_tokens.encoding
    assert torch.equal(back(IDS).logits, lm(IDS).logits)


def test_the_llm_q4_preset_exports_bit_exact(folders, tmp_path):
    """llm-q4: Q4_0's grid in the blocks and Q8_0's in the tied table, so every weight goes in as it is (exact=True)
    and our import gives back the same encodings, table included, and the same logits."""
    lm = load_model(folders["llama"])
    compress(lm, preset("llm-q4"), calibration=[{"input_ids": torch.randint(3, 259, (1, 32), generator=g)}
                                                for g in [torch.Generator().manual_seed(i) for i in range(4)]])
    result = export(lm, "gguf", tmp_path / "m.gguf", exact=True)
    assert {(t.ggml_type, t.how) for t in result.tensors if t.ggml_type != "F32"} == {("Q4_0", "exact"),
                                                                                      ("Q8_0", "exact")}
    assert next(t for t in result.tensors if t.name == "token_embd.weight").ggml_type == "Q8_0"
    back = load_gguf(tmp_path / "m.gguf", keep_blocks=True)
    for name, enc in _encodings(lm).items():
        got = back.get_submodule(name).encoding
        assert got.scheme == enc.scheme and torch.equal(got.codes, enc.codes) and torch.equal(got.scale, enc.scale)
    assert torch.equal(back(IDS).logits, lm(IDS).logits)


def test_asymmetric_g32_keeps_codes_and_rounds_only_the_offset(folders, tmp_path):
    lm = _compressed(folders, RTNConfig(bits=4, group_size=32, symmetric=False))
    result = export(lm, "gguf", tmp_path / "m.gguf")
    _, tensors = _read(tmp_path / "m.gguf")
    for name, enc in _encodings(lm).items():
        if name == "model.lm_head":
            continue
        t = tensors[gguf_name(name.removeprefix("model.") + ".weight")]
        q, d, m = gb.unpack_q4_1(np.asarray(t.data).reshape(-1, 20))
        rows = _order(t.name, lm)
        scale, zero = enc.scale.numpy()[rows].reshape(-1), enc.zero.numpy()[rows].reshape(-1)
        assert np.array_equal(q, enc.int_codes().numpy()[rows].reshape(-1, 32)) and np.array_equal(d, scale)
        exact = -(zero.astype(np.float64) * scale.astype(np.float64))
        assert np.array_equal(m, exact.astype(np.float16))  # the nearest float16 to -zero * scale
        record = next(r for r in result.tensors if r.name == t.name)
        assert record.how == ("exact" if np.array_equal(m.astype(np.float64), exact) else "offset rounded")
        written = gb.dequantise(np.asarray(t.data).reshape(-1, 20), gb.Q4_1).reshape(enc.shape)
        assert record.max_abs_change == pytest.approx(
            float(np.abs(written - enc.decode().numpy()[rows]).max()), abs=0)
        assert record.max_abs_change <= float(np.abs(exact).max()) * 2**-11 + 1e-6
    back = load_gguf(tmp_path / "m.gguf")
    assert torch.allclose(back(IDS).logits, lm(IDS).logits, atol=0.05)


def test_three_bit_groups_go_in_as_q4_0_with_the_same_weights(folders, tmp_path):
    lm = _compressed(folders, RTNConfig(bits=3, group_size=32))
    result = export(lm, "gguf", tmp_path / "m.gguf")
    assert {(t.source, t.ggml_type, t.how) for t in result.tensors if t.ggml_type != "F32"} == {
        ("int3 sym g32", "Q4_0", "exact")}
    assert torch.equal(load_gguf(tmp_path / "m.gguf")(IDS).logits, lm(IDS).logits)


def test_other_grids_are_requantised_and_listed(folders, tmp_path):
    lm = _compressed(folders, preset("llm-int8"))  # per-channel int8: not a block grid
    result = export(lm, "gguf", tmp_path / "m.gguf")
    assert len(result.requantised) == 15 and {t.ggml_type for t in result.requantised} == {"Q8_0"}
    assert "requantised" in result.summary() and "int8 sym per-channel -> Q8_0" in result.summary()
    back = load_gguf(tmp_path / "m.gguf")
    for name, enc in _encodings(lm).items():
        if name == "model.lm_head":
            continue
        record = next(t for t in result.tensors if t.name == gguf_name(name.removeprefix("model.") + ".weight"))
        change = (back.get_submodule(name).weight - enc.decode()).abs().max().item()
        assert change == pytest.approx(record.max_abs_change, rel=1e-6)
        assert 0 < change <= enc.scale.float().max().item()  # within a step of the int8 grid


def test_requested_types_and_q6_k(folders, tmp_path):
    lm = load_model(folders["llama"])
    result = export(lm, "gguf", tmp_path / "m.gguf", types={"blk.*.ffn_*": "Q8_0", "token_embd.weight": "Q4_0"},
                    float_type="F32")
    kinds = {t.name: t.ggml_type for t in result.tensors}
    assert kinds["blk.1.ffn_down.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q4_0"
    assert kinds["blk.1.attn_q.weight"] == "F32" and kinds["blk.0.attn_norm.weight"] == "F32"
    fell = export(lm, "gguf", tmp_path / "fell.gguf", types={"blk.0.ffn_down.weight": "Q6_K"})  # rows of 128
    assert [(t.name, t.ggml_type) for t in fell.fallbacks] == [("blk.0.ffn_down.weight", "Q8_0")]
    with pytest.raises(ConfigError, match="Q5_9"):
        export(lm, "gguf", tmp_path / "q6.gguf", types={"*": "Q5_9"})
    w = torch.randn(8, 512)
    data, kind, record = export_tensor("w", w, gb.Q6_K, 1)
    back = gb.dequantise(data.reshape(-1, 210), gb.Q6_K).reshape(8, 512)
    assert kind == gb.Q6_K and record.how == "requantised" and data.shape == (8, 2 * 210)
    assert record.max_abs_change == pytest.approx(float(np.abs(back - w.numpy()).max()), abs=0)
    assert record.max_abs_change < w.abs().max().item() / 31


def test_metadata_is_what_llama_cpp_reads(folders, tmp_path):
    import json

    lm = load_model(folders["llama"])
    export(lm, "gguf", tmp_path / "m.gguf")
    reader, _ = _read(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in reader.fields.items()}
    cfg = lm.model.config
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == cfg.num_hidden_layers
    assert (f["llama.embedding_length"], f["llama.feed_forward_length"], f["llama.context_length"]) == (
        cfg.hidden_size, cfg.intermediate_size, cfg.max_position_embeddings)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.vocab_size"] == cfg.vocab_size
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    vocab = json.loads(lm.support_files["tokenizer.json"])["model"]["vocab"]
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and set(f["tokenizer.ggml.token_type"][3:]) == {1}
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert lm.tokenizer.encode("hello world") == load_gguf(tmp_path / "m.gguf").tokenizer.encode("hello world")


def test_pre_tokenizer_name_is_carried_through_a_gguf_round_trip(folders, tmp_path):
    export(load_model(folders["llama"]), "gguf", tmp_path / "a.gguf", tokenizer_pre="smollm")
    export(load_gguf(tmp_path / "a.gguf"), "gguf", tmp_path / "b.gguf")
    reader, _ = _read(tmp_path / "b.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_untied_output_layer_is_written(folders, tmp_path):
    lm = load_model(folders["llama"])
    lm.model.lm_head.weight = torch.nn.Parameter(lm.model.lm_head.weight.detach() * 0.5, requires_grad=False)
    lm.model.config.tie_word_embeddings = False
    export(lm, "gguf", tmp_path / "m.gguf", float_type="F32")
    _, tensors = _read(tmp_path / "m.gguf")
    assert "output.weight" in tensors
    assert torch.equal(load_gguf(tmp_path / "m.gguf")(IDS).logits, lm(IDS).logits)


def test_from_a_checkpoint_folder_and_the_cli(folders, tmp_path, capsys):
    lm = _compressed(folders, RTNConfig(bits=4, group_size=32))
    save(lm, tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "Q4_0 exact" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "ck"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ck"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--overwrite", "--type", "blk.*=Q8_0"]) == 0
    assert torch.equal(load_gguf(tmp_path / "m.gguf", keep_blocks=True)(IDS).logits,
                       load_gguf(tmp_path / "m.gguf")(IDS).logits)


def test_what_a_gguf_cannot_hold_is_refused(folders, tmp_path):
    with pytest.raises(UnsupportedError, match="'qwen2'.*--format hf"):
        export(load_model(folders["qwen2"]), "gguf", tmp_path / "q.gguf")
    with pytest.raises(UnsupportedError, match="causal LMs"):
        export(torch.nn.Linear(4, 4), "gguf", tmp_path / "l.gguf")
    with pytest.raises(ConfigError, match="unknown export format"):
        export(load_model(folders["llama"]), "safetensors", tmp_path / "x")
    (tmp_path / "there.gguf").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        export(load_model(folders["llama"]), "gguf", tmp_path / "there.gguf")
    assert not list(tmp_path.glob(".*.part"))


def test_exact_refuses_what_would_change_naming_the_recipe_that_fits(folders, tmp_path, capsys):
    lm = _compressed(folders, preset("llm-int8"))
    with pytest.raises(ConfigError, match="int8 sym per-channel.*llm-q4"):
        export(lm, "gguf", tmp_path / "m.gguf", exact=True)
    with pytest.raises(ConfigError, match="F32"):
        export(load_model(folders["llama"]), "gguf", tmp_path / "m.gguf", exact=True)
    assert not (tmp_path / "m.gguf").exists()
    export(load_model(folders["llama"]), "gguf", tmp_path / "m.gguf", exact=True, float_type="F32")
    save(_compressed(folders, RTNConfig(bits=4, group_size=32)), tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), "--format", "gguf", "--out", str(tmp_path / "q.gguf"), "--exact"]) == 0
    save(lm, tmp_path / "ck8")
    assert main(["export", str(tmp_path / "ck8"), "--format", "gguf", "--out", str(tmp_path / "r.gguf"), "--exact"]) == 2
    assert "no GGUF block type holds" in capsys.readouterr().err


def test_a_damaged_block_scale_is_our_error(folders, tmp_path):
    export(_compressed(folders, RTNConfig(bits=8, group_size=32)), "gguf", tmp_path / "m.gguf")
    info = check_gguf(tmp_path / "m.gguf")
    target = next(t for t in info.tensors if t.name == "blk.0.ffn_up.weight")
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    struct.pack_into("<e", data, target.offset + 34 * 3, float("inf"))  # the fourth block's d
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="not finite"):
        load_gguf(tmp_path / "bad.gguf", keep_blocks=True)
