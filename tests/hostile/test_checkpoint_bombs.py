"""No bombs: sizes a checkpoint declares are checked against what it really holds and against the
memory available before anything is allocated; nesting and numbers are capped before parsing.

Where a regression would allocate gigabytes, the load runs in a forked child whose address space is
capped, so a bomb that slipped through fails the test instead of the machine."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from _tiny_source import (_tiny_checkpoint_master, _tiny_source_master, edit_manifest, embeddings,  # noqa: F401
                          in_child, replace_file, tiny_checkpoint, tiny_source)

from torch import nn

from modelpress.compress import compress
from modelpress.errors import FormatError, LimitExceededError
from modelpress.formats.checkpoint import load, save
from modelpress.formats.entropy import coder_available
from modelpress.formats.manifest import MANIFEST, WEIGHTS
from modelpress.limits import MAX_JSON_BYTES

GIB = 1 << 30


def test_a_config_declaring_a_huge_model_is_refused_without_allocating(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(hidden_size=8192, num_hidden_layers=24, intermediate_size=32768, num_attention_heads=64)
    replace_file(tiny_checkpoint, "config.json", json.dumps(config).encode())  # hash updated: a consistent forgery
    kind, message = in_child(lambda: load(tiny_checkpoint), memory_limit=2 * GIB)
    assert kind == "FormatError", (kind, message)
    assert "is (32,)" in message or "expects" in message or "does not match" in message, message


def test_a_config_with_a_huge_vocabulary_is_refused_without_allocating(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(vocab_size=1 << 34, max_position_embeddings=1 << 30)
    replace_file(tiny_checkpoint, "config.json", json.dumps(config).encode())
    kind, message = in_child(lambda: load(tiny_checkpoint), memory_limit=2 * GIB)
    assert kind == "FormatError", (kind, message)


def _bell_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.weight, std=0.05)  # bell-shaped, like trained weights: skewed codes get entropy-coded
    return model


@pytest.fixture
def coded_checkpoint(tmp_path):
    model = compress(_bell_model(), {"stages": [{"pass": "rtn", "config": {"bits": 4, "group_size": "channel"}}]})
    path = save(model, tmp_path / "coded")
    assert json.loads((path / MANIFEST).read_text()).get("entropy_coded"), "nothing was entropy-coded"
    return path


@pytest.mark.skipif(not coder_available(), reason="needs the native rANS coder (modelpress._fcodec)")
@pytest.mark.parametrize("shape", [[2**34], [2**17, 2**17], [2**32 - 1]])
def test_an_entropy_coded_shape_beyond_its_payload_is_refused_before_allocating(coded_checkpoint, shape):
    name = sorted(json.loads((coded_checkpoint / MANIFEST).read_text())["entropy_coded"])[0]
    edit_manifest(coded_checkpoint, lambda m: m["entropy_coded"][name].update(shape=shape))
    kind, message = in_child(lambda: load(coded_checkpoint, model=_bell_model()), memory_limit=2 * GIB)
    assert kind == "FormatError" and "its manifest entry needs" in message, (kind, message)
    edit_manifest(coded_checkpoint, lambda m: m["entropy_coded"][name].update(shape=[-1]))
    with pytest.raises(FormatError, match="invalid shape"):
        load(coded_checkpoint, model=_bell_model())


def test_deep_manifest_is_refused_before_parsing(tiny_checkpoint):
    (tiny_checkpoint / MANIFEST).write_bytes(b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(LimitExceededError, match="100001 levels deep"):
        load(tiny_checkpoint)


def test_oversized_manifest_is_refused_before_reading(tiny_checkpoint):
    with open(tiny_checkpoint / MANIFEST, "ab") as fh:
        fh.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(LimitExceededError, match="more than the"):
        load(tiny_checkpoint)


@pytest.mark.parametrize("rel", ["config.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json"])
def test_deep_support_json_is_refused_before_parsing(tiny_checkpoint, rel):
    replace_file(tiny_checkpoint, rel, b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")
    with pytest.raises(LimitExceededError, match="10001 levels deep"):
        load(tiny_checkpoint)


def test_deep_tokenizer_json_is_a_format_error(tiny_checkpoint):
    replace_file(tiny_checkpoint, "tokenizer.json", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FormatError, match="tokenizer.json is not valid"):
        load(tiny_checkpoint)


@pytest.mark.parametrize("claim", [1 << 62, 1 << 40])
def test_a_weights_header_claiming_more_than_the_file_is_refused(tiny_checkpoint, claim):
    data = bytearray((tiny_checkpoint / WEIGHTS).read_bytes())
    data[:8] = struct.pack("<Q", claim)
    replace_file(tiny_checkpoint, WEIGHTS, bytes(data))
    kind, message = in_child(lambda: load(tiny_checkpoint), memory_limit=2 * GIB)
    assert kind == "FormatError" and "header claims" in message, (kind, message)


def test_a_weights_tensor_declared_larger_than_its_bytes_is_refused(tiny_checkpoint):
    data = (tiny_checkpoint / WEIGHTS).read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 20, 1 << 20]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    replace_file(tiny_checkpoint, WEIGHTS, struct.pack("<Q", len(text)) + text + data[8 + size:])
    kind, message = in_child(lambda: load(tiny_checkpoint), memory_limit=2 * GIB)
    assert kind == "FormatError" and "does not fill its data_offsets" in message, (kind, message)


def test_numbers_of_thousands_of_digits_are_refused(tiny_checkpoint):
    text = (tiny_checkpoint / MANIFEST).read_text().replace('"format_version": 1', '"format_version": ' + "1" * 5000)
    (tiny_checkpoint / MANIFEST).write_text(text)
    with pytest.raises(FormatError, match="integer of 5000 digits"):
        load(tiny_checkpoint)


def test_a_checkpoint_still_loads_after_the_refusals(tiny_checkpoint, _tiny_checkpoint_master):
    assert embeddings(load(tiny_checkpoint)).shape == (6, 32)
