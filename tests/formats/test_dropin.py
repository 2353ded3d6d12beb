"""Drop-in where users come from: the encoder's `encode` takes sentence-transformers' arguments with their
meaning (checked against sentence-transformers itself on a tiny folder), and the causal LM runs under
transformers' `generate` and `pipeline`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_lm import write_tiny_lm
from hostile._tiny_source import SENTENCES, write_tiny_source
from modelpress import RTNConfig
from modelpress.compress import compress
from modelpress.errors import ConfigError
from modelpress.formats.models import load_model

st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_source(tmp_path_factory.mktemp("dropin") / "st")


@pytest.fixture(scope="module")
def pair(tiny_folder):
    """(our encoder, sentence-transformers' model) of the same folder."""
    return load_model(tiny_folder), st.SentenceTransformer(str(tiny_folder), device="cpu")


KWARGS = [
    {},
    {"convert_to_numpy": True},
    {"convert_to_tensor": True},
    {"convert_to_numpy": True, "convert_to_tensor": True},
    {"convert_to_numpy": False, "convert_to_tensor": False},
    {"normalize_embeddings": True, "convert_to_tensor": True},
    {"batch_size": 2, "convert_to_numpy": True},
    {"batch_size": 1, "show_progress_bar": False, "convert_to_tensor": True},
]


def _kind(value) -> str:
    if isinstance(value, np.ndarray):
        return f"numpy {value.dtype} {value.shape}"
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype} {tuple(value.shape)}"
    if isinstance(value, list):
        return f"list of {len(value)} " + ", ".join(sorted({_kind(v) for v in value}))
    return type(value).__name__


def _as_array(value) -> np.ndarray:
    if isinstance(value, list):
        return np.stack([v.numpy() for v in value])
    return value.numpy() if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
@pytest.mark.parametrize("single", [False, True], ids=["list", "string"])
def test_encode_matches_sentence_transformers(pair, kwargs, single):
    ours, theirs = pair
    sentences = SENTENCES[0] if single else SENTENCES
    got = ours.encode(sentences, **kwargs)
    want = theirs.encode(sentences, **{"convert_to_tensor": True, **kwargs} if not kwargs else kwargs)
    assert _kind(got) == _kind(want)
    np.testing.assert_allclose(_as_array(got), _as_array(want), atol=2e-6, rtol=0)


def test_encode_defaults_to_a_tensor_and_keeps_input_order(pair):
    ours, _ = pair
    whole = ours.encode(SENTENCES)
    one_by_one = torch.stack([ours.encode(s) for s in SENTENCES])
    assert isinstance(whole, torch.Tensor) and whole.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(whole, one_by_one, atol=1e-6, rtol=0)


def test_normalize_embeddings_gives_unit_rows(tiny_folder):
    encoder = load_model(tiny_folder)
    encoder.config = type(encoder.config)(pooling="mean", normalize=False, max_seq_length=32)  # no Normalize module
    raw = encoder.encode(SENTENCES)
    unit = encoder.encode(SENTENCES, normalize_embeddings=True)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-3)
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)


def test_progress_bar_goes_to_stderr(pair, capsys):
    ours, _ = pair
    ours.encode(SENTENCES, batch_size=2, show_progress_bar=True)
    captured = capsys.readouterr()
    assert "3/3" in captured.err and captured.out == ""


@pytest.mark.parametrize("kwargs", [{"convert_to_numpy": 1}, {"normalize_embeddings": "yes"}, {"batch_size": 0}])
def test_encode_refuses_bad_arguments(pair, kwargs):
    with pytest.raises(ConfigError):
        pair[0].encode(SENTENCES, **kwargs)


def test_compressed_encoder_encodes_like_its_float_model(tiny_folder):
    float_model = load_model(tiny_folder)
    small = compress(load_model(tiny_folder), "int8")
    cos = torch.nn.functional.cosine_similarity(small.encode(SENTENCES, convert_to_tensor=True),
                                                float_model.encode(SENTENCES, convert_to_tensor=True))
    assert cos.min() > 0.999
    assert isinstance(small.encode(SENTENCES, convert_to_numpy=True), np.ndarray)


# -- the causal LM under transformers' generate and pipeline ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    folder = write_tiny_lm("llama", tmp_path_factory.mktemp("dropin-lm") / "llama")
    return folder, compress(load_model(folder), {"model.model.layers.*": RTNConfig(bits=4, symmetric=True, group_size=32)})


def _greedy_reference(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by hand: the argmax of the full forward, one token at a time (no cache)."""
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids, use_cache=False).logits  # (1, T, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_transformers_generate_runs_the_compressed_model(tiny_lm):
    _, lm = tiny_lm
    assert any(type(m).__name__ == "CompressedLinear" for m in lm.model.modules())
    ids = torch.tensor([lm.tokenizer.encode("hello world")])
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(out, _greedy_reference(lm.model, ids, 8))
    assert torch.equal(lm.generate(ids, max_new_tokens=8, do_sample=False), out)


def test_text_generation_pipeline_runs_the_compressed_model(tiny_lm):
    _, lm = tiny_lm
    prompt = "hello world"
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    want = lm.tokenizer.decode(_greedy_reference(lm.model, ids, 6)[0, ids.shape[1]:])
    for pipe in (transformers.pipeline("text-generation", model=lm.model, tokenizer=lm.tokenizer), lm.pipeline()):
        (result,) = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)
        assert result["generated_text"] == want


def test_pipeline_given_the_wrapper_says_to_unwrap_it(tiny_lm):
    _, lm = tiny_lm
    with pytest.raises(AttributeError, match="lm.model"):
        transformers.pipeline("text-generation", model=lm, tokenizer=lm.tokenizer)
    assert not hasattr(lm, "config")  # code that unwraps a wrapper by `.config` still does
