"""The real SmolLM2-135M (fp32: 538 MB of weights, 265 MB of chunks) through moto's S3 server: push, clone into a
fresh folder, byte-identical tensors (to the pushing store's and to the model's own), and a second push that sends
nothing. The fine-tuned child's second push is measured on SmolLM2 by benchmarks/bench_remote.py --models smollm2
(and asserted on MiniLM by test_remote_minilm.py)."""

from __future__ import annotations

import pytest
import torch

from _remote_support import s3_endpoint, s3_url  # noqa: F401 (fixtures)
from modelpress.store import Store
from modelpress.store.remote import Remote
from modelpress.store.remote_maint import verify_remote
from modelpress.store.remote_pull import clone
from modelpress.store.remote_push import push


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


@pytest.mark.slow
def test_smollm2_push_clone_byte_identical(smollm2_float, tmp_path, s3_url):
    model = smollm2_float[0]
    with Store.init(tmp_path / "a") as store:
        store.put(model, "smollm2")  # the default codecs: 265 MB of chunks (raw fp32 took longer here)
        first = push(store, Remote(s3_url), "smollm2")
        n_chunks = len(store.catalog.all_chunk_ids())
        assert first.chunks_sent == n_chunks and first.chunks_skipped == 0
        again = push(store, Remote(s3_url), "smollm2")
        assert again.chunks_sent == 0 and again.chunks_skipped == n_chunks
        assert again.record_bytes < 200  # its push marker only: it names the version the remote holds
        want = store.get("smollm2")
    cloned, fetched = clone(s3_url, tmp_path / "b")
    with cloned:
        assert fetched.chunks_sent == n_chunks and fetched.bytes_sent == first.bytes_sent
        got = cloned.get("smollm2")  # (every chunk was hash-checked as it arrived, and again as it is read)
    print(f"SmolLM2: pushed {first.line('sent')}; clone {fetched.line('fetched')}")
    assert want.keys() == got.keys()
    for key in want:
        assert _bytes(want[key]).equal(_bytes(got[key])), key
    own = model.state_dict()
    assert sum(t.numel() for t in got.values()) >= 134_000_000
    for key in got:
        assert _bytes(got[key]).equal(_bytes(own[key])), key  # and what was pushed is the model itself
    assert verify_remote(Remote(s3_url), quick=True).ok
