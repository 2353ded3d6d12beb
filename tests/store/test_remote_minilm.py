"""The real MiniLM (bundled `minilm`) fp32 and int4 through moto's S3 server: push, clone, byte-identical tensors,
and a fine-tuned child's push sending its delta and little more."""

from __future__ import annotations

import copy

import pytest
import torch

import modelpress
from _remote_support import s3_endpoint, s3_url  # noqa: F401 (fixtures)
from modelpress.store import Store
from modelpress.store.remote import Remote
from modelpress.store.remote_maint import verify_remote
from modelpress.store.remote_pull import clone
from modelpress.store.remote_push import push


@pytest.mark.slow
def test_minilm_fp32_and_int4_push_clone_and_a_fine_tuned_child(minilm, tmp_path, s3_url):
    float_model = copy.deepcopy(minilm)
    with Store.init(tmp_path / "a") as store:
        base = store.put(float_model, "minilm", message="fp32")
        int4 = modelpress.compress(copy.deepcopy(minilm), "int4")
        int4_base = store.put(int4, "minilm-int4", message="int4")
        first = push(store, Remote(s3_url))
        assert first.chunks_sent == len(store.catalog.all_chunk_ids())
        cloned, fetched = clone(s3_url, tmp_path / "b")
        with cloned:
            assert fetched.bytes_sent == first.bytes_sent
            for name in ("minilm", "minilm-int4"):
                want, got = store.get(name), cloned.get(name)
                assert want.keys() == got.keys()
                for key in want:
                    assert want[key].contiguous().view(torch.uint8).equal(got[key].contiguous().view(torch.uint8))
            sentences = ["a model store on object storage", "only the missing chunks move"]
            with torch.no_grad():
                assert torch.equal(cloned.load("minilm-int4").encode(sentences),
                                   store.load("minilm-int4").encode(sentences))
        with torch.no_grad():  # a fine-tune of the last layer
            for name, p in float_model.named_parameters():
                if ".layer.5." in name:
                    p.add_(torch.randn_like(p) * 1e-4)
        child = store.put(float_model, "minilm", message="fine-tuned")
        payload = store.stored_bytes("minilm", child, exclusive_of=base)
        files, rows = store.added_bytes("minilm", child, base)
        second = push(store, Remote(s3_url), "minilm")
        print(f"fine-tuned child: chunk payloads {payload} bytes; push {second.line('sent')}")
        # within 5% of the chunk payloads alone (heads and the record coded against the parent's included)
        assert second.total_bytes <= payload * 1.05, (second.total_bytes, payload)
        assert second.delta_bytes == files + rows and second.delta_line() is not None  # the command prints both
        assert Remote(s3_url).resolve("minilm") == child
        with torch.no_grad():  # the int4 model's last block: only its float tensors (biases, LayerNorms) move
            for name, p in int4.named_parameters():
                if ".layer.5." in name and p.dtype.is_floating_point:
                    p.add_(torch.randn_like(p) * 1e-4)
        int4_child = store.put(int4, "minilm-int4", message="fine-tuned")
        files, rows = store.added_bytes("minilm-int4", int4_child, int4_base)
        tiny = push(store, Remote(s3_url), "minilm-int4")
        assert 0 < tiny.chunks_sent < 20 and tiny.delta_bytes == files + rows
        # the acceptance's measure: what the child added to the local store (chunk files and catalogue rows)
        assert tiny.total_bytes <= tiny.delta_bytes * 1.05, (tiny.total_bytes, tiny.delta_bytes)
    assert verify_remote(Remote(s3_url)).ok
