"""Quantisation benchmark on the bundled all-MiniLM-L6-v2: modelpress presets next to PyTorch's and
ONNX Runtime's dynamic int8, in one run, on one corpus.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quant.py [--sentences 2000] [--threads 2]

Fidelity is against fp32 on held-out standard-library sentences; size is the whole saved weights
file of each tool against the 90.9 MB fp32 model.safetensors; latency is encoding 512 sentences
(batch 32) at a fixed thread count, timed in interleaved rounds (every model once per round) so
that machine noise hits all models alike, and reported as the median ratio to fp32 in the same run.
The table is written into benchmarks/RESULTS.md between this benchmark's markers.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelpress  # noqa: E402
from modelpress.data.corpus import corpus_splits  # noqa: E402
from modelpress.evaluate.fidelity import fidelity  # noqa: E402
from modelpress.evaluate.size import folder_bytes  # noqa: E402
from modelpress.formats.checkpoint import WEIGHTS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MARK_BEGIN, MARK_END = "<!-- bench_quant:begin -->", "<!-- bench_quant:end -->"


from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

def build_models(encoder, workdir: Path, presets: list[str], with_peers: bool):
    """(name, encode function, weights bytes, note) for fp32, each preset and each peer."""
    models = [("fp32 (PyTorch)", encoder.encode, folder_bytes(encoder.source), "")]
    for name in presets:
        model = modelpress.compress(copy.deepcopy(encoder), name)
        path = modelpress.save(model, workdir / f"modelpress-{name}")
        models.append((f"modelpress {name}", model.encode, (path / WEIGHTS).stat().st_size, ""))
    if with_peers:
        import peers

        built = [
            peers.torch_dynamic_int8(encoder, per_channel=False, workdir=workdir),
            peers.torch_dynamic_int8(encoder, per_channel=True, workdir=workdir),
            peers.ort_dynamic_int8(encoder, per_channel=False, weight_type="QInt8", workdir=workdir),
            peers.ort_dynamic_int8(encoder, per_channel=True, weight_type="QInt8", workdir=workdir),
            peers.ort_dynamic_int8(encoder, per_channel=True, weight_type="QUInt8", workdir=workdir),
        ]
        models += [(p.name, p.encode, p.size_bytes, p.note) for p in built]
    return models


def time_interleaved(models, sentences: list[str], threads: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per model per round; every model runs once per round (after one warm-up each)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _, encode, _, _ in models:
            encode(sentences)
        times: dict[str, list[float]] = {name: [] for name, *_ in models}
        for _ in range(rounds):
            for name, encode, _, _ in models:
                start = time.perf_counter()
                encode(sentences)
                times[name].append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--latency-sentences", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--presets", default="int8,w8a8,int4,int3")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    encoder = modelpress.load_sentence_encoder("minilm")
    sentences = list(corpus_splits(n_eval=args.sentences, n_calib=1).evaluation)
    latency_batch = sentences[: args.latency_sentences]
    reference = encoder.encode(sentences)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = build_models(encoder, workdir, args.presets.split(","), not args.no_peers)
        rows = []
        for name, encode, size, note in models:
            f = fidelity(reference, encode(sentences))
            rows.append({"name": name, "bytes": size, "fidelity": f.to_dict(), "note": note})
            print(f"{name:50s} {size / 1e6:6.1f} MB  cos {f.mean_cosine:.4f}  ov@10 {f.overlap_at_10:.3f}", flush=True)
        times = time_interleaved(models, latency_batch, args.threads, args.rounds)
    fp32_bytes, fp32_median = rows[0]["bytes"], statistics.median(times[rows[0]["name"]])
    for row in rows:
        runs = times[row["name"]]
        row["latency_s"] = statistics.median(runs)
        row["latency_ratio"] = statistics.median(r / f for r, f in zip(runs, times[rows[0]["name"]]))
        row["latency_ratio_range"] = (min(r / f for r, f in zip(runs, times[rows[0]["name"]])),
                                      max(r / f for r, f in zip(runs, times[rows[0]["name"]])))
        row["size_ratio"] = row["bytes"] / fp32_bytes
    table = render(rows, args, fp32_median)
    print(table)
    if not args.no_write:
        write_results(table)
        (RESULTS.parent / "results_quant.json").write_text(json.dumps(rows, indent=1))


def render(rows, args, fp32_median: float) -> str:
    import onnxruntime

    lines = [
        f"Run {datetime.date.today()} on {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}.",
        "",
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quant.py --sentences {args.sentences} "
        f"--threads {args.threads} --rounds {args.rounds}`",
        "",
        f"Fidelity on {args.sentences} held-out sentences (overlap@10 over 200 queries); latency = encoding "
        f"{args.latency_sentences} sentences, batch 32, median of {args.rounds} interleaved rounds "
        f"(fp32: {fp32_median:.2f} s); ratio = median of per-round ratios to fp32 [min-max].",
        "",
        "| model | weights MB | vs fp32 | mean cos | p1 cos | overlap@10 | latency s | vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fidelity"]
        lo, hi = r["latency_ratio_range"]
        lines.append(
            f"| {r['name']} | {r['bytes'] / 1e6:.1f} | {r['size_ratio']:.1%} | {f['mean_cosine']:.4f} | "
            f"{f['p1_cosine']:.4f} | {f['overlap_at_10']:.3f} | {r['latency_s']:.2f} | "
            f"{r['latency_ratio']:.2f}x [{lo:.2f}-{hi:.2f}] |"
        )
    return "\n".join(lines)


def write_results(table: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{MARK_BEGIN}\n{table}\n{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Quantisation: MiniLM, modelpress presets vs PyTorch and ONNX Runtime\n\n" + block + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
