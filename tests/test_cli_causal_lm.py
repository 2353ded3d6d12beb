"""The CLI on causal LMs (tiny random models): compress --eval prints perplexity, agreement and
tokens/s and writes them as JSON; eval, inspect and store put/get accept the model and its checkpoint;
a .gguf file is a source like a folder."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_lm import write_tiny_gguf, write_tiny_lm
from modelpress.cli import main
from modelpress.evaluate import llm
from modelpress.formats.checkpoint import load, read_manifest
from modelpress.store import Store


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_lm("llama", tmp_path_factory.mktemp("cli-lm") / "llama")


@pytest.fixture
def short_text(monkeypatch):
    """Two windows of 64 tokens and two prompts: the evaluation's shape, not its length, is under test."""
    real = llm.evaluate_causal_lm

    def quick(*args, **kwargs):
        return real(*args, **{**kwargs, "window": 64, "prompts": ["the store", "a layer"], "new_tokens": 4})

    monkeypatch.setattr("modelpress.cli.model_cmds.evaluate_causal_lm", quick)


def _run(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_compress_eval_json_inspect_store(capsys, tmp_path, tiny_llama, short_text):
    out_dir, report, store = tmp_path / "q", tmp_path / "report.json", tmp_path / "store"
    out = _run(capsys, "compress", tiny_llama, "--recipe", "int8", "--out", out_dir, "--eval", "--windows", 2,
               "--json", report, "--store", store, "--name", "tiny")
    assert "perplexity" in out and "tok" in out
    data = json.loads(report.read_text())
    assert data["candidate"]["perplexity"] > 1 and 0 <= data["top1_agreement"] <= 1
    assert read_manifest(out_dir)["architecture"]["kind"] == "causal-lm"

    out = _run(capsys, "eval", tiny_llama, out_dir, "--windows", 2, "--no-latency")
    assert "perplexity" in out
    out = _run(capsys, "inspect", out_dir)
    assert "lm_head" in out or "embed_tokens" in out

    _run(capsys, "store", "put", store, out_dir, "tiny")
    _run(capsys, "store", "get", store, "tiny", "--out", tmp_path / "restored")
    with Store(store) as opened:
        again = opened.load("tiny")
    ids = torch.tensor([[5, 6, 7]])
    expected = load(out_dir).generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(again.generate(ids, max_new_tokens=5, do_sample=False), expected)
    assert torch.equal(load(tmp_path / "restored").generate(ids, max_new_tokens=5, do_sample=False), expected)


def test_a_gguf_file_is_a_source(capsys, tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    _run(capsys, "compress", gguf, "--recipe", "int4", "--out", tmp_path / "q")
    assert read_manifest(tmp_path / "q")["architecture"]["kind"] == "causal-lm"
    _run(capsys, "store", "init", tmp_path / "store")
    _run(capsys, "store", "put", tmp_path / "store", gguf, "from-gguf")


def test_eval_refuses_a_model_of_another_kind(capsys, tmp_path, tiny_llama):
    _run(capsys, "compress", tiny_llama, "--recipe", "int8", "--out", tmp_path / "q")
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert main(["eval", str(encoder), str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_sensitivity_of_a_causal_lm_plans_mixed_precision(capsys, tmp_path, tiny_llama):
    recipe = tmp_path / "mixed.yaml"
    out = _run(capsys, "sensitivity", tiny_llama, "--recipe", "int3", "--windows", 1, "--budget", 4,
               "--write-recipe", recipe)
    assert "KL" in out and "model.lm_head" in out and "mixed precision within 4" in out
    _run(capsys, "compress", tiny_llama, "--recipe", recipe, "--out", tmp_path / "q")
    assert read_manifest(tmp_path / "q")["architecture"]["kind"] == "causal-lm"
