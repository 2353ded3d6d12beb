"""The real bundled all-MiniLM-L6-v2, end to end: presets hold their fidelity and size on held-out
sentences, and saved models reload with identical outputs. Latency is measured by the benchmark,
not asserted here (timed tests are flaky on a shared 2-core machine)."""

from __future__ import annotations

import copy

import pytest
import torch

import modelpress
from modelpress.data.corpus import corpus_splits
from modelpress.evaluate.fidelity import fidelity
from modelpress.evaluate.size import folder_bytes
from modelpress.formats.checkpoint import WEIGHTS

pytestmark = pytest.mark.slow

# (preset, min mean cosine, min overlap@10, max size vs fp32 file) -- the foundation issue's bars.
BARS = [("int8", 0.999, 0.95, 0.27), ("w8a8", 0.975, 0.78, 0.27), ("int4", 0.97, 0.80, 0.16)]


@pytest.fixture(scope="module")
def sentences():
    return list(corpus_splits(n_eval=600, n_calib=1).evaluation)


@pytest.fixture(scope="module")
def reference(minilm, sentences):
    return minilm.encode(sentences)


def test_our_encoder_matches_sentence_transformers(minilm, sentences):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm.source), device="cpu")
    theirs = st.encode(sentences[:64], convert_to_tensor=True, batch_size=32)
    torch.testing.assert_close(minilm.encode(sentences[:64]), theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset, min_cos, min_overlap, max_size", BARS)
def test_preset_fidelity_size_and_exact_reload(minilm, sentences, reference, tmp_path, preset, min_cos, min_overlap,
                                               max_size):
    model = modelpress.compress(copy.deepcopy(minilm), preset)
    got = model.encode(sentences)
    f = fidelity(reference, got)
    assert f.mean_cosine >= min_cos, f
    assert f.overlap_at_10 >= min_overlap, f
    path = modelpress.save(model, tmp_path / preset)
    ratio = (path / WEIGHTS).stat().st_size / folder_bytes(minilm.source)
    assert ratio <= max_size, ratio
    reloaded = modelpress.load(path)
    assert torch.equal(reloaded.encode(sentences[:100]), model.encode(sentences[:100]))


def test_embedding_tables_are_quantised_by_every_preset(minilm):
    from modelpress.nn import CompressedEmbedding

    presets = [p for p in modelpress.preset_names() if not p.startswith("llm-")]  # those calibrate on an LM's text
    assert len(presets) >= 5
    for preset in presets:
        model = modelpress.compress(copy.deepcopy(minilm), preset)
        assert isinstance(model.model.embeddings.word_embeddings, CompressedEmbedding), preset
