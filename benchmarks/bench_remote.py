"""Loading a model straight from S3: `Store.open("s3://...").get(model)` vs downloading the same weights as one
safetensors file with s3fs and parsing it, both against the same S3 endpoint, in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_remote.py                 # moto's S3 server on loopback
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_remote.py --rounds 1 --models minilm   # a quick check
    AWS_PROFILE=... .venv/bin/python benchmarks/bench_remote.py --url s3://BUCKET/PREFIX  # a real bucket

For each model (MiniLM fp32 and int4 by default): the store's version and a safetensors file of the same
float weights (the int4 model's file holds its packed codes and scales, as a checkpoint would) are uploaded;
then, interleaved per round: (a) `Store.open(url).get(model)` (parallel chunk reads into one arena, every
chunk hash-checked), (b) `s3fs.cat(file)` + `safetensors.torch.load`, (c) `Store.open(url).get(model, names=[one
tensor])`. Reported: median wall time and the exact bytes moved (chunk objects; the whole file). Times are
only figures on a quiet machine; the bytes are exact anywhere. moto serves from this process's memory
through a Python web server, so it favours few large requests: a real S3 endpoint is the figure that counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import s3fs
import safetensors.torch
import torch

import modelpress
from modelpress.formats.checkpoint import describe
from modelpress.formats.models import load_model
from modelpress.store import Store
from modelpress.store.remote import Remote
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
            push(store, Remote(url), name)
            tensors = _flat_tensors(model)
            blob = safetensors.torch.save(tensors)
            path = f"{url[len('s3://'):]}/files/{name}.safetensors"
            fs.pipe_file(path, blob)
            one = max(tensors, key=lambda k: tensors[k].numel())
            times: dict[str, list[float]] = {"store": [], "safetensors": [], "store_one": []}
            fetched = {}
            for _ in range(args.rounds):
                with Store.open(url, threads=args.threads) as remote:
                    start = time.perf_counter()
                    got = remote.get(name)
                    times["store"].append(time.perf_counter() - start)
                    fetched["store"] = remote.bytes_fetched
                with Store.open(url, threads=args.threads) as remote:
                    start = time.perf_counter()
                    remote.get(name, names=[one])
                    times["store_one"].append(time.perf_counter() - start)
                    fetched["store_one"] = remote.bytes_fetched
                start = time.perf_counter()
                data = fs.cat_file(path)
                loaded = safetensors.torch.load(data)
                times["safetensors"].append(time.perf_counter() - start)
                fetched["safetensors"] = len(data)
            assert len(got) == len(loaded) and all(torch.equal(got[k], loaded[k]) for k in loaded)
            row = {"model": name, "tensors": len(tensors), "largest": one,
                   **{f"{k}_s": statistics.median(v) for k, v in times.items()},
                   **{f"{k}_bytes": v for k, v in fetched.items()}}
            results.append(row)
            print(f"{name}: store get {row['store_s']:.3f} s, {row['store_bytes']} bytes fetched | safetensors "
                  f"whole file {row['safetensors_s']:.3f} s, {row['safetensors_bytes']} bytes | one tensor "
                  f"({one}) {row['store_one_s']:.3f} s, {row['store_one_bytes']} bytes", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if server is not None:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
