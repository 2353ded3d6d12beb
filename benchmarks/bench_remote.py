"""Remotes on S3, per model, in one run: push and clone (bytes and times), a fine-tuned child's second push against
its local delta, and loading straight from S3 — `Store.open("s3://...").get(model)` vs downloading the same weights
as one safetensors file with s3fs and parsing it — against the same S3 endpoint.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_remote.py                 # moto's S3 server on loopback
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_remote.py --rounds 1 --models minilm   # a quick check
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_remote.py --models smollm2 --rounds 3
    AWS_PROFILE=... .venv/bin/python benchmarks/bench_remote.py --url s3://BUCKET/PREFIX  # a real bucket

For each model (MiniLM fp32 and int4 by default; `smollm2`): the model is stored and pushed to its own prefix
(`push_s`, `push_bytes`), cloned into a fresh folder (`clone_s`, `clone_bytes`) and checked byte-identical;
a child with the last block fine-tuned (noise of 1e-4 on its float weights) is stored and pushed
(`child_push_bytes` against `child_delta_bytes`: what the child adds to the local store, its chunk files not
shared with its parent plus its catalogue rows, the local counterpart of the remote's version record; and
against `child_delta_payload`, the chunks' payloads alone; `child_disk_growth`: how much the local store's folder
grew on disk when the child was stored, sqlite pages included, a check on `child_delta_bytes`);
a safetensors file of the same weights (the int4 model's holds its packed codes and scales, as a checkpoint
would) is uploaded; then, interleaved per round: (a) `Store.open(url).get(model)` (parallel chunk reads into
one arena, every chunk hash-checked), (b) `s3fs.cat(file)` + `safetensors.torch.load`, (c)
`Store.open(url).get(model, names=[one tensor])`, (d) every chunk object of the model fetched by plain s3fs
GETs on as many threads as the load uses (what the requests alone cost this server). Reported: median wall
time and the exact bytes moved (chunk objects; the whole file). Times are only figures on a quiet machine; the bytes are exact anywhere. moto serves
from this process's memory through a Python web server, so it favours few large requests: a real S3 endpoint
is the figure that counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import s3fs
import safetensors.torch
import torch

import modelpress
from modelpress.formats.checkpoint import describe
from modelpress.formats.models import load_model
from modelpress.store import Store
from modelpress.store.remote import Remote
from modelpress.store.remote_pull import clone
from modelpress.store.remote_push import push


def _moto() -> object:
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION":
                       "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    return server


def _flat_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds (encoded parts of compressed modules included)."""
    _, tensors, _ = describe(model)
    return {k: v.contiguous() for k, v in tensors.items()}


def _models(names: list[str]) -> dict[str, torch.nn.Module]:
    out = {}
    if "minilm" in names or "minilm-int4" in names:
        minilm = load_model("minilm")
        if "minilm" in names:
            out["minilm"] = minilm
        if "minilm-int4" in names:
            out["minilm-int4"] = modelpress.compress(copy.deepcopy(minilm), "int4")
    if "smollm2" in names:
        out["smollm2"] = load_model("smollm2")
    return out


def _fine_tune_last_block(model) -> None:
    """Noise of 1e-4 on the float weights of the highest-numbered block (a fine-tune of the last layer)."""
    params = dict(model.named_parameters())
    layer = max(int(m.group(1)) for n in params if (m := re.search(r"\.(\d+)\.", n)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in params.items():
            if f".{layer}." in name and p.dtype.is_floating_point:
                p.add_(torch.randn(p.shape, generator=g) * 1e-4)


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8))
                                        for k in a)


def _push_and_clone(store: Store, name: str, url: str, tmp: Path) -> dict:
    """Push, then clone into a fresh folder (checked byte-identical)."""
    start = time.perf_counter()
    pushed = push(store, Remote(url), name)
    push_s = time.perf_counter() - start
    start = time.perf_counter()
    cloned, fetched = clone(url, tmp / f"clone-{name}")
    clone_s = time.perf_counter() - start
    with cloned:
        assert _same_bytes(store.get(name), cloned.get(name)), f"{name}: the clone differs"
    return {"push_s": push_s, "push_bytes": pushed.total_bytes, "push_chunks": pushed.chunks_sent,
            "clone_s": clone_s, "clone_bytes": fetched.bytes_sent + fetched.record_bytes}


def _disk_bytes(store: Store) -> int:
    """Bytes of every file under the store's folder, the catalogue's write-ahead log checkpointed first: a
    cross-check of `added_bytes` by what the disk holds (sqlite pages included)."""
    store.catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file())


def _child_push(store: Store, name: str, model, url: str) -> dict:
    """A child with its last block fine-tuned: its second push against its local delta over the parent."""
    base = store.resolve(name)
    child = copy.deepcopy(model)
    _fine_tune_last_block(child)
    before = _disk_bytes(store)
    vid = store.put(child, name, message="fine-tuned last block")
    grown = _disk_bytes(store) - before
    payload = store.stored_bytes(name, vid, exclusive_of=base)
    files, rows = store.added_bytes(name, vid, base)
    second = push(store, Remote(url), name)
    assert second.delta_bytes == files + rows
    print(f"  {name} child: {second.line('sent')}", flush=True)
    return {"child_delta_bytes": files + rows, "child_delta_files": files, "child_delta_rows": rows,
            "child_delta_payload": payload, "child_push_bytes": second.total_bytes,
            "child_record_bytes": second.record_bytes, "child_disk_growth": grown,
            "child_push_over_delta": second.total_bytes / (files + rows) - 1.0,
            "child_push_over_payload": second.total_bytes / payload - 1.0 if payload else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an s3:// prefix to use (default: a bucket on a local moto server)")
    parser.add_argument("--models", default="minilm,minilm-int4", help="comma-separated: minilm, minilm-int4, smollm2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=16, help="parallel chunk requests of a store load")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    server = None if args.url else _moto()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url = args.url
    if url is None:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        url = f"s3://{bucket}/models"
    models = _models(args.models.split(","))
    results = []
    with tempfile.TemporaryDirectory() as tmp, Store.init(Path(tmp) / "store") as store:
        for name, model in models.items():
            store.put(model, name)
            model_url = f"{url}/{name}"
            moved = _push_and_clone(store, name, model_url, Path(tmp))
            tensors = _flat_tensors(model)
            blob = safetensors.torch.save(tensors)
            path = f"{url[len('s3://'):]}/files/{name}.safetensors"  # outside every model's prefix
            fs.pipe_file(path, blob)
            one = max(tensors, key=lambda k: tensors[k].numel())
            chunk_keys = sorted(fs.find(f"{model_url[len('s3://'):]}/chunks"))
            times: dict[str, list[float]] = {"store": [], "safetensors": [], "store_one": [], "gets": []}
            fetched = {}
            for _ in range(args.rounds):
                with Store.open(model_url, threads=args.threads) as remote:
                    start = time.perf_counter()
                    got = remote.get(name)
                    times["store"].append(time.perf_counter() - start)
                    fetched["store"] = remote.bytes_fetched
                with Store.open(model_url, threads=args.threads) as remote:
                    start = time.perf_counter()
                    remote.get(name, names=[one])
                    times["store_one"].append(time.perf_counter() - start)
                    fetched["store_one"] = remote.bytes_fetched
                start = time.perf_counter()
                with ThreadPoolExecutor(args.threads) as pool:
                    fetched["gets"] = sum(map(len, pool.map(fs.cat_file, chunk_keys)))
                times["gets"].append(time.perf_counter() - start)
                start = time.perf_counter()
                data = fs.cat_file(path)
                loaded = safetensors.torch.load(data)
                times["safetensors"].append(time.perf_counter() - start)
                fetched["safetensors"] = len(data)
            assert len(got) == len(loaded) and all(torch.equal(got[k], loaded[k]) for k in loaded)
            moved.update(_child_push(store, name, model, model_url))
            row = {"model": name, "tensors": len(tensors), "largest": one, **moved,
                   **{f"{k}_s": statistics.median(v) for k, v in times.items()},
                   **{f"{k}_bytes": v for k, v in fetched.items()}}
            results.append(row)
            print(f"{name}: push {row['push_s']:.3f} s, {row['push_bytes']} bytes | clone {row['clone_s']:.3f} s, "
                  f"{row['clone_bytes']} bytes (byte-identical) | fine-tuned child: local delta "
                  f"{row['child_delta_bytes']} bytes ({row['child_delta_files']} chunk files + "
                  f"{row['child_delta_rows']} catalogue rows; payloads {row['child_delta_payload']}; the store's folder "
                  f"grew {row['child_disk_growth']}), second push "
                  f"{row['child_push_bytes']} bytes ({row['child_record_bytes']} of them record, ref and marker): "
                  f"{100 * row['child_push_over_delta']:+.2f}% over the delta, "
                  f"{100 * row['child_push_over_payload']:+.2f}% over the payloads", flush=True)
            print(f"{name}: store get {row['store_s']:.3f} s, {row['store_bytes']} bytes fetched | safetensors "
                  f"whole file {row['safetensors_s']:.3f} s, {row['safetensors_bytes']} bytes | one tensor "
                  f"({one}) {row['store_one_s']:.3f} s, {row['store_one_bytes']} bytes | plain GETs of its "
                  f"{len(chunk_keys)} chunk objects, {args.threads} at a time, {row['gets_s']:.3f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if server is not None:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
