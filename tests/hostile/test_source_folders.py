"""Hostile or broken source folders (what `modelpress compress` reads): every bad config.json,
tokenizer.json, sentence-transformers file or weights file ends in the project's error, one line,
without hanging and without allocating what a file merely declares; the folder is never changed."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny_source import (SENTENCES, _tiny_source_master, embeddings, folder_digest, in_child,  # noqa: F401
                          tiny_source, with_deadline)
from safetensors.torch import load_file, save_file

from modelpress.errors import FormatError, LimitExceededError, ModelNotFoundError, ModelpressError, NotRegularFileError
from modelpress.errors import UnsupportedError
from modelpress.formats.hf import load_sentence_encoder

GIB = 1 << 30


def _fails(folder, error=FormatError, match: str | None = None) -> str:
    before = folder_digest(folder)
    with pytest.raises(error, match=match) as info:
        load_sentence_encoder(folder)
    assert "\n" not in str(info.value)
    assert folder_digest(folder) == before
    return str(info.value)


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("text, match", [
    ("{", "config.json is not valid JSON"),
    ("[1, 2]", "config.json is not valid: it has no model_type"),
    ('{"hidden_size": 32}', "no model_type"),
    ('{"model_type": ["bert"]}', "no model_type"),
    ('{"model_type": "no-such-model"}', "config.json is not valid"),
    ("\xff\xfe", "not UTF-8"),
    ('{"model_type": "bert", "hidden_size": 1' + "0" * 5000 + "}", "integer of 5001 digits"),
    ('{"model_type": "bert", "a": ' + "[" * 10_000 + "]" * 10_000 + "}", "levels deep"),
])
def test_bad_config_json(tiny_source, text, match):
    (tiny_source / "config.json").write_bytes(text.encode("latin-1"))
    _fails(tiny_source, FormatError, match)


@pytest.mark.parametrize("change", [
    {"hidden_size": "wide"}, {"num_attention_heads": 0}, {"hidden_size": 33}, {"num_hidden_layers": -1},
    {"vocab_size": [1]}, {"hidden_act": "no-such-activation"}, {"layer_norm_eps": "small"},
    {"max_position_embeddings": None},
])
def test_config_json_with_wrong_values(tiny_source, change):
    (tiny_source / "config.json").write_text(json.dumps({**_config(tiny_source), **change}))
    _fails(tiny_source, ModelpressError)


@pytest.mark.parametrize("change", [
    {"hidden_size": 8192, "num_hidden_layers": 24, "intermediate_size": 32768, "num_attention_heads": 64},
    {"vocab_size": 1 << 34},
    {"max_position_embeddings": 1 << 33},
])
def test_config_json_declaring_a_huge_model_is_refused_without_allocating(tiny_source, change):
    (tiny_source / "config.json").write_text(json.dumps({**_config(tiny_source), **change}))
    kind, message = in_child(lambda: load_sentence_encoder(tiny_source), memory_limit=2 * GIB)
    assert kind in ("FormatError", "LimitExceededError"), (kind, message)


@pytest.mark.parametrize("text, match", [
    ("{", "tokenizer.json is not valid"),
    ("{}", "tokenizer.json is not valid"),
    ('{"model": {"type": "WordPiece", "vocab": [1, 2]}}', "tokenizer.json is not valid"),
    ("\xff", "tokenizer.json is not valid: it is not UTF-8"),
    ("[" * 100_000, "tokenizer.json is not valid"),
])
def test_bad_tokenizer_json(tiny_source, text, match):
    (tiny_source / "tokenizer.json").write_bytes(text.encode("latin-1"))
    _fails(tiny_source, FormatError, match)


def test_missing_tokenizer_json(tiny_source):
    (tiny_source / "tokenizer.json").unlink()
    _fails(tiny_source, ModelNotFoundError, "no tokenizer.json")


@pytest.mark.parametrize("text, match", [
    ("[]", "it must be a JSON object"),
    ('"cls"', "it must be a JSON object"),
    ("{", "not valid JSON"),
])
def test_bad_pooling_config(tiny_source, text, match):
    (tiny_source / "1_Pooling" / "config.json").write_text(text)
    _fails(tiny_source, FormatError, match)


def test_unsupported_pooling(tiny_source):
    (tiny_source / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": False,
                                                                       "pooling_mode_max_tokens": True}))
    _fails(tiny_source, UnsupportedError, "only mean or CLS pooling")


@pytest.mark.parametrize("config", [[], "x", {"max_seq_length": "long"}, {"max_seq_length": -1},
                                    {"max_seq_length": [32]}, {"max_seq_length": True}, {"max_seq_length": 1 << 40}])
def test_bad_sentence_bert_config(tiny_source, config):
    (tiny_source / "sentence_bert_config.json").write_text(json.dumps(config))
    _fails(tiny_source, FormatError, "sentence_bert_config.json is not valid")


@pytest.mark.parametrize("modules", [{"0": "Transformer"}, 7, "Normalize"])
def test_bad_modules_json(tiny_source, modules):
    (tiny_source / "modules.json").write_text(json.dumps(modules))
    _fails(tiny_source, FormatError, "modules.json is not valid")


def test_modules_json_entries_of_odd_types_are_ignored(tiny_source):
    reference = embeddings(load_sentence_encoder(tiny_source))
    modules = json.loads((tiny_source / "modules.json").read_text()) + [1, None, {"type": ["x"]}]
    (tiny_source / "modules.json").write_text(json.dumps(modules))
    assert torch.equal(embeddings(load_sentence_encoder(tiny_source)), reference)


@pytest.mark.parametrize("rel", ["model.safetensors", "config.json", "tokenizer.json", "1_Pooling/config.json"])
def test_a_fifo_in_the_source_is_refused_without_blocking(tiny_source, rel):
    (tiny_source / rel).unlink()
    os.mkfifo(tiny_source / rel)
    with pytest.raises(NotRegularFileError, match="not a regular file"):
        with_deadline(lambda: load_sentence_encoder(tiny_source))


@pytest.mark.parametrize("rel", ["model.safetensors", "tokenizer.json"])
def test_a_link_to_a_device_is_refused(tiny_source, rel):
    (tiny_source / rel).unlink()
    (tiny_source / rel).symlink_to("/dev/zero")
    with pytest.raises(NotRegularFileError, match="not a regular file"):
        with_deadline(lambda: load_sentence_encoder(tiny_source))


def test_links_to_regular_files_are_followed_as_in_the_hugging_face_cache(tmp_path, tiny_source):
    reference = embeddings(load_sentence_encoder(tiny_source))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for rel in ("model.safetensors", "config.json", "tokenizer.json"):
        (tiny_source / rel).rename(blobs / rel)
        (tiny_source / rel).symlink_to(blobs / rel)
    assert torch.equal(embeddings(load_sentence_encoder(tiny_source)), reference)


@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_truncated_weights(tiny_source, cut):
    data = (tiny_source / "model.safetensors").read_bytes()
    (tiny_source / "model.safetensors").write_bytes(data[:cut])
    _fails(tiny_source, FormatError)


def test_weights_that_do_not_match_the_config(tiny_source):
    state = load_file(str(tiny_source / "model.safetensors"))
    name = "embeddings.word_embeddings.weight"
    save_file({**state, name: state[name][:10].contiguous()}, str(tiny_source / "model.safetensors"))
    _fails(tiny_source, FormatError, f"tensor '{name}' is \\(10, 32\\)")
    save_file({k: v for k, v in state.items() if k != name}, str(tiny_source / "model.safetensors"))
    _fails(tiny_source, FormatError, "missing \\['embeddings.word_embeddings.weight'\\]")
    save_file({**state, name: state[name].to(torch.int32)}, str(tiny_source / "model.safetensors"))
    _fails(tiny_source, FormatError, "torch.int32")


def test_half_precision_weights_are_widened(tiny_source):
    reference = embeddings(load_sentence_encoder(tiny_source))
    state = load_file(str(tiny_source / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              str(tiny_source / "model.safetensors"))
    model = load_sentence_encoder(tiny_source)
    assert model.model.embeddings.word_embeddings.weight.dtype == torch.float32
    assert torch.allclose(embeddings(model), reference, atol=2e-3)


def test_pickle_weights_are_not_read(tiny_source):
    (tiny_source / "model.safetensors").rename(tiny_source / "pytorch_model.bin")
    _fails(tiny_source, ModelNotFoundError, "pytorch_model.bin is a pickle and is not read")


def test_oversized_support_file_is_refused_before_reading(tiny_source, monkeypatch):
    import modelpress.formats.hf as hf

    monkeypatch.setattr(hf, "MAX_SUPPORT_FILE_BYTES", 100)
    _fails(tiny_source, LimitExceededError, "more than the 100")


def test_the_source_loads_as_the_reference_does(tiny_source):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(tiny_source), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(embeddings(load_sentence_encoder(tiny_source)), reference, atol=1e-6)


def test_position_buffers_come_from_a_fresh_model_where_the_initialiser_leaves_them(tiny_source, monkeypatch):
    from transformers import BertModel

    reference = embeddings(load_sentence_encoder(tiny_source))
    monkeypatch.setattr(BertModel, "_init_weights", lambda self, module: None)  # as transformers 4 does for buffers
    model = load_sentence_encoder(tiny_source)
    assert torch.equal(model.model.embeddings.position_ids[0], torch.arange(64))
    assert torch.equal(embeddings(model), reference)
