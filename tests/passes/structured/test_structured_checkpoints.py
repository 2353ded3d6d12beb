"""Structurally pruned models save and load with their new shapes; hostile shape records are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import modelpress
from modelpress.errors import FormatError
from modelpress.formats.checkpoint import MANIFEST
from modelpress.passes.structured import apply_shapes, record_shapes
from _structured_support import SmallCNN, bert_inputs, gen, params, run_bert, stage, tiny_bert  # noqa: E402


# ---------------------------------------------------------------- save and load


def test_pruned_bert_saves_and_reloads_with_its_new_shapes(tmp_path):
    model, skeleton = tiny_bert(), tiny_bert(seed=1)
    modelpress.compress(model, {"stages": [{"pass": "prune_ffn", "config": {"ratio": 0.25}},
                                           {"pass": "prune_heads", "config": {"ratio": 0.5},
                                            "targets": {"include": ["encoder.layer.1.attention"]}},
                                           {"pass": "magnitude", "config": {"pattern": "2:4"},
                                            "targets": {"include": ["encoder.layer.0.*"]}}]})
    path = modelpress.save(model, tmp_path / "bert")
    loaded = modelpress.load(path, model=skeleton)
    inputs = bert_inputs()
    assert torch.equal(run_bert(loaded, inputs), run_bert(model, inputs))
    assert loaded.encoder.layer[1].attention.self.num_attention_heads == 2
    assert loaded.encoder.layer[0].attention.self.num_attention_heads == 4
    assert params(loaded) == params(model)


def test_pruned_cnn_saves_and_reloads(tmp_path):
    model, skeleton = SmallCNN().eval(), SmallCNN().eval()
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.5}}]})
    path = modelpress.save(model, tmp_path / "cnn")
    loaded = modelpress.load(path, model=skeleton)
    x = torch.randn(2, 3, 8, 8, generator=gen(0))
    assert torch.equal(loaded(x), model(x))


def _tamper(path, name, entry):
    manifest = json.loads((path / MANIFEST).read_text())
    if entry is None:
        manifest["shapes"] = name
    else:
        manifest["shapes"][name] = entry
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, entry, message", [
    ("features.0", {"type": "conv2d", "size": [16, 3]}, "widths must lie"),
    ("features.0", {"type": "conv2d", "size": [0, 3]}, "widths must lie"),
    ("features.0", {"type": "conv2d", "size": [4]}, "widths must lie"),
    ("features.0", {"type": "conv2d", "size": [4, True]}, "widths must lie"),
    ("features.0", {"type": "linear", "size": [4, 3]}, "does not match"),
    ("nowhere", {"type": "linear", "size": [4, 3]}, "does not match"),
    ("", {"type": "linear", "size": [4, 3]}, "does not match"),
    (["not", "a", "map"], None, "must map"),
])
def test_hostile_shapes_are_refused(tmp_path, name, entry, message):
    model = SmallCNN().eval()
    path = modelpress.save(model, tmp_path / "cnn")
    _tamper(path, name, entry)
    with pytest.raises(FormatError, match=message):
        modelpress.load(path, model=SmallCNN())


def test_declared_shapes_must_agree_with_the_arrays(tmp_path):
    model = SmallCNN().eval()
    path = modelpress.save(model, tmp_path / "cnn")
    _tamper(path, "head", {"type": "linear", "size": [5, 100]})
    with pytest.raises(FormatError, match="head.weight"):
        modelpress.load(path, model=SmallCNN())


def test_record_and_apply_shapes_round_trip():
    model = modelpress.compress(tiny_bert(), stage("prune_ffn", ratio=0.5))
    skeleton = tiny_bert()
    apply_shapes(skeleton, record_shapes(model))
    assert record_shapes(skeleton) == record_shapes(model)


# ---------------------------------------------------------------- the real MiniLM


@pytest.mark.slow
def test_minilm_ffn_pruning_really_shrinks_and_reloads(minilm, tmp_path):
    from modelpress.data.corpus import corpus_splits

    model = modelpress.compress(copy.deepcopy(minilm), stage("prune_ffn", ratio=0.3))
    sentences = list(corpus_splits(n_eval=64, n_calib=1).evaluation)
    layer = model.model.encoder.layer[0]
    assert layer.intermediate.dense.weight.shape == (1075, 384) and layer.output.dense.weight.shape == (384, 1075)
    assert params(model) == params(minilm) - 6 * 461 * (384 + 1 + 384)
    emb = model.encode(sentences)
    assert F.cosine_similarity(emb, minilm.encode(sentences)).mean() > 0.7  # no fine-tuning: a real loss
    path = modelpress.save(model, tmp_path / "minilm-ffn30")
    assert torch.equal(modelpress.load(path).encode(sentences), emb)
