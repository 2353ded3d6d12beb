"""MiniLM from the store: streamed under 16 MB with the full load's embeddings, and at bfloat16 precision from
its high planes (under 55% of the stored bytes, mean cosine >= 0.9999), refined to bit-identical."""

from __future__ import annotations

import pytest
import torch

from modelpress.data.corpus import corpus_splits
from modelpress.regions import open_streamed
from modelpress.store import Store, planes


@pytest.fixture(scope="module")
def sentences():
    return list(corpus_splits(n_eval=64).evaluation)


@pytest.mark.slow
def test_minilm_streamed_under_16_mb_gives_the_full_loads_embeddings(minilm, sentences, tmp_path):
    store = Store.init(tmp_path / "store")
    store.put(minilm, "minilm", chunk_bytes={"*word_embeddings.weight": 16384})
    expected = store.load("minilm").encode(sentences)
    with open_streamed(store, "minilm", memory="16MB") as run:
        got = run.encode(sentences)
        assert run.weight_bytes() <= 16_000_000
        assert run.plan.region_bytes()["streamed"] > 0
    assert torch.equal(got, expected)
    store.close()


@pytest.mark.slow
def test_minilm_at_bf16_from_its_planes_then_refined(minilm, sentences, tmp_path):
    store = Store.init(tmp_path / "store")
    store.put(minilm, "minilm", planes=["*"])
    version = store.version("minilm")
    rows = store.catalog.chunks([c for t in version.tensors for c in t.chunks])
    stored = {t.name: sum(rows[c].stored_size for c in t.chunks) for t in version.tensors}
    high = sum(size for name, size in stored.items() if not name.endswith(planes.LO))
    assert high <= 0.55 * sum(stored.values())
    reference = minilm.encode(sentences)
    model = store.load("minilm", precision="bf16")
    cosine = torch.nn.functional.cosine_similarity(model.encode(sentences), reference).mean()
    assert cosine >= 0.9999
    store.refine(model, "minilm")
    assert torch.equal(model.encode(sentences), reference)
    store.close()
