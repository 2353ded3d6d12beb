"""Remotes: push, pull, clone and Store.open(URL) against moto's S3 server (and a folder, and memory://)."""

from __future__ import annotations

import copy
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

import modelpress
from _remote_support import chunk_puts, counting_remote, s3_endpoint, s3_url  # noqa: F401 (fixtures)
from modelpress.cli import main
from modelpress.formats.models import load_model
from modelpress.recipe import Recipe
from modelpress.store import Store
from modelpress.store.remote import Remote
from modelpress.store.remote_maint import verify_remote
from modelpress.store.remote_pull import clone, pull
from modelpress.store.remote_push import push

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_lm import write_tiny_lm  # noqa: E402
from _toy_encoder import ToyEncoder, toy_encoder  # noqa: E402


def assert_same_tensors(a: dict, b: dict) -> None:
    """Byte-identical: same names, dtypes, shapes and bytes."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].contiguous().view(torch.uint8).equal(b[name].contiguous().view(torch.uint8)), name


# 4-bit symmetric groups of 32 by round to nearest: llm-q4's grid without its GPTQ calibration (20 s here)
_INT4 = Recipe.from_dict({"name": "int4-rtn", "stages": [{"pass": "rtn", "targets": {"types": ["Linear"]},
                                                          "config": {"bits": 4, "symmetric": True, "group_size": 32}}]})


def _models(tmp_path: Path) -> dict:
    encoder = toy_encoder()
    lm = load_model(write_tiny_lm("llama", tmp_path / "tiny-llama"))
    return {"toy-fp32": encoder, "toy-int8": modelpress.compress(copy.deepcopy(encoder), "int8"),
            "llama-fp32": lm, "llama-int4": modelpress.compress(copy.deepcopy(lm), _INT4)}


def test_push_then_clone_gives_byte_identical_tensors_on_s3(tmp_path, s3_url):
    with Store.init(tmp_path / "a") as store:
        for name, model in _models(tmp_path).items():
            store.put(model, name, message=name)
        report = push(store, Remote(s3_url))
        assert report.chunks_sent == len(store.catalog.all_chunk_ids()) > 20  # each distinct chunk once
        assert sorted(r.split("@")[0] for r in report.refs) == sorted(n for n, _ in store.models())
        cloned, fetched = clone(s3_url, tmp_path / "b")
        with cloned:
            assert fetched.chunks_sent == report.chunks_sent and fetched.bytes_sent == report.bytes_sent
            for name, _ in store.models():
                assert cloned.resolve(name) == store.resolve(name)
                assert_same_tensors(cloned.get(name), store.get(name))
            assert cloned.verify().ok
            tokens = torch.tensor([[1, 5, 9, 13]])
            with torch.no_grad():
                want = store.load("llama-int4").model(tokens).logits
                got = cloned.load("llama-int4").model(tokens).logits
            assert torch.equal(want, got)
    assert verify_remote(Remote(s3_url)).ok


def test_second_push_of_a_fine_tuned_child_sends_its_delta_only(tmp_path, s3_url):
    lm = load_model(write_tiny_lm("llama", tmp_path / "tiny-llama"))
    with Store.init(tmp_path / "a") as store:
        base = store.put(lm, "llama")
        push(store, Remote(s3_url), "llama")
        with torch.no_grad():  # a fine-tune of the MLPs of one layer: small steps on a few tensors
            for name, p in lm.model.named_parameters():
                if "layers.1.mlp" in name:
                    p.add_(torch.randn_like(p) * 1e-3)
        child = store.put(lm, "llama", message="fine-tuned")
        payload = store.stored_bytes("llama", child, exclusive_of=base)
        files, rows = store.added_bytes("llama", child, base)
        remote, counter = counting_remote(s3_url)
        report = push(store, remote, "llama")
        assert report.bytes_sent == files and payload < files <= payload * 1.05  # the chunk files, heads and all
        # the record, coded against the parent's, costs less than the version's rows in the local catalogue
        assert 0 < report.record_bytes < rows, (report.record_bytes, rows)
        assert report.total_bytes <= (files + rows) * 1.05
        assert report.chunks_sent == len(set(chunk_puts(counter))) == len(chunk_puts(counter))
        assert report.chunks_skipped > 0
        delta = files + rows
        assert report.delta_bytes == delta and report.delta_rows == rows  # reported next to what it sent
        assert report.delta_line() == (f"local delta over the parent: {delta} bytes ({files} of chunk files, {rows} of "
                                       f"catalogue rows); this push sent {report.total_bytes} bytes "
                                       f"({100 * report.total_bytes / delta:.2f}% of it)")
        assert Remote(s3_url).resolve("llama") == child
        with Store.init(tmp_path / "b") as other:
            pull(other, Remote(s3_url), "llama")
            assert_same_tensors(other.get("llama"), store.get("llama"))


def test_store_open_url_loads_a_version_and_only_the_chunks_asked_for(tmp_path, s3_url, small_chunks):
    model = toy_encoder()
    with Store.init(tmp_path / "a") as store:
        store.put(model, "toy")
        push(store, Remote(s3_url))
        want = store.get("toy")
        with Store.open(s3_url) as remote:
            assert_same_tensors(remote.get("toy"), want)
            whole = remote.bytes_fetched
            assert whole >= store.stored_bytes("toy")
            one = remote.get("toy", names=["embed.weight"])
            assert_same_tensors(one, {"embed.weight": want["embed.weight"]})
            assert remote.bytes_fetched - whole < whole / 2
            loaded = remote.load("toy", skeleton=ToyEncoder().eval())
        ids = model.tokenize(["model weights store"])
        with torch.no_grad():
            assert torch.equal(loaded(**ids), model(**ids))
        with store.open("toy") as lazy:  # the instance's open is still the lazy one
            assert torch.equal(lazy["head.bias"], want["head.bias"])


@pytest.mark.parametrize("kind", ["folder", "memory"])
def test_folder_and_memory_remotes(tmp_path, kind, small_chunks):
    url = str(tmp_path / "remote") if kind == "folder" else f"memory://mp-{tmp_path.name}/r"
    model = toy_encoder()
    with Store.init(tmp_path / "a") as store:
        store.put(model, "toy")
        first = push(store, Remote(url))
        again = push(store, Remote(url))
        assert again.chunks_sent == 0 and again.chunks_skipped == first.chunks_sent
        assert again.record_bytes < 200  # its push marker only: it names the version the remote holds
        cloned, _ = clone(url, tmp_path / "b")
        with cloned:
            assert_same_tensors(cloned.get("toy"), store.get("toy"))
        assert verify_remote(Remote(url)).ok


def test_cli_remote_push_pull_clone_get_verify_gc(tmp_path, s3_url, small_chunks, capsys):
    ckpt = modelpress.save(modelpress.compress(load_model(write_tiny_lm("llama", tmp_path / "lm")), "llm-int8"),
                           tmp_path / "ckpt")
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert main(["store", "init", a]) == 0
    assert main(["store", "put", a, str(ckpt), "toy"]) == 0
    assert main(["store", "remote", "add", a, "origin", s3_url]) == 0
    assert json.loads((tmp_path / "a" / "remotes.json").read_text()) == {"origin": {"url": s3_url}}
    capsys.readouterr()
    assert main(["store", "push", a, "origin", "toy"]) == 0
    out = capsys.readouterr().out
    assert "sent" in out and "skipped 0 chunks" in out and "toy@latest" in out
    assert main(["store", "push", a, "origin"]) == 0
    assert "sent 0 chunks (0 bytes)" in capsys.readouterr().out
    assert main(["store", "clone", s3_url, b]) == 0
    assert main(["store", "init", c]) == 0
    assert main(["store", "pull", c, s3_url, "toy"]) == 0
    with Store(a) as sa, Store(b) as sb, Store(c) as sc:
        assert_same_tensors(sb.get("toy"), sa.get("toy"))
        assert_same_tensors(sc.get("toy"), sa.get("toy"))
    assert main(["store", "get", s3_url, "toy", "--out", str(tmp_path / "out")]) == 0
    assert modelpress.load(tmp_path / "out") is not None
    capsys.readouterr()
    assert main(["store", "remote", "verify", "origin", "--store", a]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    assert main(["store", "remote", "gc", s3_url, "--grace", "0"]) == 0
    assert "removed 0 chunks" in capsys.readouterr().out
    assert main(["store", "remote", "ls", a]) == 0
    assert s3_url in capsys.readouterr().out
    assert main(["store", "ls", s3_url]) == 0 and main(["store", "log", s3_url, "toy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("toy  1 version(s)") and out.count("\n") == 2
    with Store(a) as sa:  # a child: the push reports its local delta next to what it sent
        state = sa.get("toy")
        name = max((k for k in state if state[k].is_floating_point()), key=lambda k: state[k].numel())
        child = sa.put({**state, name: state[name] + 1}, "toy")
        files, rows = sa.added_bytes("toy", child, sa.catalog.version(child).info.parent)
        assert files > 0 and rows > 0
    capsys.readouterr()
    assert main(["store", "push", a, "origin", "toy"]) == 0
    assert (f"local delta over the parent: {files + rows} bytes ({files} of chunk files, {rows} of catalogue rows); "
            "this push sent ") in capsys.readouterr().out
    folder = str(tmp_path / "folder-remote")  # a folder path is a remote too (names hold no '/')
    assert main(["store", "push", a, folder]) == 0 and main(["store", "remote", "verify", folder]) == 0


def test_credentials_are_never_written_into_the_store(tmp_path, s3_url):
    with Store.init(tmp_path / "a") as store:
        store.put({"w": torch.randn(8, 8)}, "m")
        assert main(["store", "remote", "add", str(store.root), "bad", "s3://AKIA:secret@bucket/x"]) != 0
        assert main(["store", "remote", "add", str(store.root), "origin", s3_url]) == 0
        assert main(["store", "push", str(store.root), "origin"]) == 0
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert b"testing" not in path.read_bytes(), path  # the dummy key, secret and token are all "testing"
    backend = Remote(s3_url).backend  # nor onto the remote (its records, refs and markers)
    keys = ["REMOTE"] + [e.key for prefix in ("refs", "versions", "pushes", "gc", "chunks")
                         for e in backend.list(prefix)]
    assert len(keys) >= 4
    for key in keys:
        assert b"testing" not in backend.get(key, 1 << 20), key


def test_versions_by_id_prefix_and_the_marker(tmp_path, small_chunks):
    url = str(tmp_path / "remote")
    with Store.init(tmp_path / "a") as store:
        v1 = store.put({"w": torch.randn(64, 64)}, "m")
        v2 = store.put({"w": torch.randn(64, 64)}, "m")
        with pytest.raises(modelpress.errors.StoreError, match="no modelpress remote"):
            pull(store, Remote(url))
        push(store, Remote(url), f"m@{v1[:10]}")  # an old version: on the remote, but no ref names it
        assert Remote(url).refs() == {}
        push(store, Remote(url), "m")
        remote = Remote(url)
        assert remote.resolve("m") == v2 and remote.resolve("m", v1[:8]) == v1
        with Store.init(tmp_path / "b") as other:
            report = pull(other, remote, f"m@{v1[:8]}")
            assert report.record_bytes > 0 and report.refs == []
            assert_same_tensors(other.get("m", v1), store.get("m", v1))
    (tmp_path / "remote" / "REMOTE").write_text('{"format": "something else", "version": 1}')
    with pytest.raises(modelpress.errors.FormatError, match="not a modelpress remote"):
        Store.open(url)


@pytest.mark.parametrize("kind", ["folder", "s3", "memory"])
def test_compare_and_swap_lets_exactly_one_of_many_writers_win(tmp_path, kind, request):
    url = {"folder": str(tmp_path / "r"), "memory": f"memory://cas-{tmp_path.name}/r"}.get(kind)
    if kind == "s3":
        url = request.getfixturevalue("s3_url")
    remote = Remote(url)
    remote.ensure()
    backend = remote.backend
    assert backend.put_if_match("refs/m/latest", b'{"version": "0"}', None)
    assert not backend.put_if_match("refs/m/latest", b'{"version": "1"}', None)  # there already
    _, tag = backend.get_tagged("refs/m/latest", 4096)
    wins, start = [], threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        # every writer's bytes differ from the current ones ("0"): a write of identical bytes keeps the tag, so
        # a second writer would rightly pass the check after it (on S3 as here)
        if backend.put_if_match("refs/m/latest", json.dumps({"version": str(i + 1)}).encode(), tag):
            wins.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert json.loads(backend.get("refs/m/latest", 4096)) == {"version": str(wins[0] + 1)}
