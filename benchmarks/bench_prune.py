"""Pruning benchmark, one run: MiniLM unstructured / N:M pruning against PyTorch's global L1 pruning,
the sparse kernel against dense matmul, structured FFN pruning (latency and fidelity), and the
digits CNN's accuracy against sparsity with and without gradual fine-tuning.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_prune.py [--sentences 2000] [--threads 2]

MiniLM fidelity is against fp32 on held-out standard-library sentences (`corpus_splits(2000, 128)`;
the 128 calibration sentences are disjoint). "Linear bytes" are the stored bytes of the 36 encoder
Linear weights (values + positions, what the checkpoint writes for them) against 42.5 MB of fp32.
Latency is encoding 512 sentences (batch 32) at a fixed thread count, every model once per round,
in interleaved rounds; the ratio is the median of per-round ratios to fp32. The markdown table is
written to benchmarks/results_prune.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import modelpress
from modelpress.data.corpus import corpus_splits
from modelpress.evaluate.fidelity import fidelity
from modelpress.nn import CompressedLinear, Kernel
from modelpress.nn.kernels import _time, prepare, select_kernel

HERE = Path(__file__).resolve().parent
RESULTS, RESULTS_JSON = HERE / "results_prune.md", HERE / "results_prune.json"
ENCODER_LINEARS = {"include": ["model.encoder.*"], "types": ["Linear"]}


from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from timing import time_batch_interleaved  # noqa: E402

def encoder_linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if n.startswith("model.encoder.") and
            isinstance(m, (torch.nn.Linear, CompressedLinear))}


def linear_bytes(model) -> int:
    total = 0
    for m in encoder_linears(model).values():
        total += m.encoding.nbytes if isinstance(m, CompressedLinear) else m.weight.numel() * 4
    return total


# ---------------------------------------------------------------------------------------------
# MiniLM: unstructured and N:M


def torch_global_l1(encoder, sparsity: float):
    """The peer: torch.nn.utils.prune global L1 over the encoder Linears, made permanent (dense zeros)."""
    from torch.nn.utils import prune

    model = copy.deepcopy(encoder)
    params = [(m, "weight") for m in encoder_linears(model).values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
        for m, name in params:
            prune.remove(m, name)
    return model


def csr_int64_bytes(model) -> int:
    """What the peer's weights cost as PyTorch CSR tensors (int64 indices)."""
    total = 0
    for m in encoder_linears(model).values():
        nnz = int((m.weight != 0).sum())
        total += nnz * (4 + 8) + (m.weight.shape[0] + 1) * 8
    return total


UNSTRUCTURED = [
    ("modelpress magnitude (per layer)", "magnitude", {"sparsity": 0.5}),
    ("modelpress magnitude (global)", "magnitude", {"sparsity": 0.5, "scope": "global"}),
    ("modelpress Wanda", "wanda", {"sparsity": 0.5}),
    ("modelpress SparseGPT", "sparsegpt", {"sparsity": 0.5}),
    ("modelpress SparseGPT + int4 sym g64 (one pass)", "sparsegpt",
     {"sparsity": 0.5, "bits": 4, "symmetric": True, "group_size": 64}),
    ("modelpress magnitude 2:4", "magnitude", {"pattern": "2:4"}),
    ("modelpress Wanda 2:4", "wanda", {"pattern": "2:4"}),
    ("modelpress SparseGPT 2:4", "sparsegpt", {"pattern": "2:4"}),
    ("modelpress SparseGPT 2:4 + int4 asym g64 (one pass)", "sparsegpt",
     {"pattern": "2:4", "bits": 4, "symmetric": False, "group_size": 64}),
]


def bench_unstructured(encoder, sentences, reference, calibration, threads) -> list[dict]:
    rows = []
    dense = linear_bytes(encoder)
    peer = torch_global_l1(encoder, 0.5)
    f = fidelity(reference, peer.encode(sentences))
    rows.append({"name": "torch.nn.utils.prune global L1 50% (peer)", "pattern": "50%", "fidelity": f.to_dict(),
                 "bytes": dense, "note": f"stored dense; as PyTorch CSR int64: {csr_int64_bytes(peer) / 1e6:.1f} MB",
                 "seconds": None})
    print(rows[-1]["name"], f"cos {f.mean_cosine:.4f} ov {f.overlap_at_10:.3f}", flush=True)
    del peer
    for name, pass_name, config in UNSTRUCTURED:
        start = time.perf_counter()
        torch.set_num_threads(threads)
        model = modelpress.compress(copy.deepcopy(encoder), {"stages": [
            {"pass": pass_name, "config": config, "targets": ENCODER_LINEARS}]}, calibration=calibration)
        seconds = time.perf_counter() - start
        f = fidelity(reference, model.encode(sentences))
        kernels = sorted({m.resolved_kernel.value for m in encoder_linears(model).values()})
        pattern = config.get("pattern", f"{config.get('sparsity', 0):.0%}")
        rows.append({"name": name, "pattern": pattern, "fidelity": f.to_dict(), "bytes": linear_bytes(model),
                     "note": f"auto kernel: {', '.join(kernels)}", "seconds": seconds})
        print(name, f"cos {f.mean_cosine:.4f} ov {f.overlap_at_10:.3f} {rows[-1]['bytes'] / dense:.1%} "
              f"{seconds:.0f}s {kernels}", flush=True)
        del model
    for row in rows:
        row["bytes_ratio"] = row["bytes"] / dense
    return rows


# ---------------------------------------------------------------------------------------------
# The sparse kernel against dense matmul on MiniLM's shapes


def bench_kernels(threads: int) -> list[dict]:
    from modelpress.encodings.sparse import sparsify

    torch.set_num_threads(threads)
    rows = []
    for out_f, in_f in ((384, 384), (1536, 384), (384, 1536)):
        for density in (0.5, 0.1, 0.02):
            g = torch.Generator().manual_seed(0)
            w = torch.randn(out_f, in_f, generator=g)
            enc = sparsify(w, torch.rand(out_f, in_f, generator=g) < density)
            x = torch.randn(512, in_f, generator=g)
            dense = min(_time(prepare(Kernel.DENSE, enc), x, repeats=5) for _ in range(2))
            csr = min(_time(prepare(Kernel.SPARSE_CSR, enc), x, repeats=5) for _ in range(2))
            rows.append({"shape": f"{out_f}x{in_f}", "density": density, "dense_ms": 1e3 * dense,
                         "csr_ms": 1e3 * csr, "auto": select_kernel(enc).value})
            print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Structured FFN pruning: latency and fidelity

# kept FFN widths rounded down to a multiple of 16 (1536 -> 1376 / 1072 / 768): CPU GEMMs run such
# widths faster than odd ones, and at least the stated ratio is still removed
FFN_MULTIPLE = 16


def bench_structured(encoder, sentences, reference, calibration) -> list[dict]:
    """Fidelity and parameter count of FFN pruning at 10/30/50%, by weight norm and by activation + refit."""
    rows = [{"name": "fp32", "ratio": 0.0, "fidelity": None, "params": sum(p.numel() for p in encoder.parameters())}]
    for ratio in (0.1, 0.3, 0.5):
        for importance, reconstruct in (("l2", False), ("activation", True)):
            config = {"ratio": ratio, "importance": importance, "reconstruct": reconstruct, "multiple_of": FFN_MULTIPLE}
            model = modelpress.compress(copy.deepcopy(encoder), {"stages": [{"pass": "prune_ffn", "config": config}]},
                                        calibration=calibration if reconstruct else None)
            f = fidelity(reference, model.encode(sentences))
            label = f"FFN -{ratio:.0%} ({importance}{' + least-squares refit' if reconstruct else ''})"
            rows.append({"name": label, "ratio": ratio, "fidelity": f.to_dict(),
                         "params": sum(p.numel() for p in model.parameters())})
            print(label, f"cos {f.mean_cosine:.4f} ov {f.overlap_at_10:.3f}", flush=True)
    for row in rows:
        row["params_ratio"] = row["params"] / rows[0]["params"]
    return rows


def bench_latency(encoder, latency_batch, thread_counts, rounds) -> list[dict]:
    """Encoding time of FFN-pruned models (shapes depend only on the ratio) against fp32, interleaved rounds.

    Two summaries per ratio: the ratio of best-of-N times (interference from other jobs only ever adds
    time, so the minimum is the cleanest estimate) and the median of per-round ratios [min-max].
    """
    models = [(0.0, encoder)]
    for ratio in (0.1, 0.3, 0.5):
        models.append((ratio, modelpress.compress(copy.deepcopy(encoder), {"stages": [
            {"pass": "prune_ffn", "config": {"ratio": ratio, "multiple_of": FFN_MULTIPLE}}]})))
    rows = []
    for threads in thread_counts:
        load_start = os.getloadavg()[0]
        wall = time_batch_interleaved([(ratio, model.encode) for ratio, model in models], latency_batch, threads, rounds)
        load = (load_start, os.getloadavg()[0])
        for ratio, runs in wall.items():
            ratios = [f / r for r, f in zip(runs, wall[0.0])]
            rows.append({"ratio": ratio, "threads": threads, "rounds": len(runs), "best_s": min(runs),
                         "median_s": statistics.median(runs), "best_speedup": min(wall[0.0]) / min(runs),
                         "median_speedup": statistics.median(ratios), "range": (min(ratios), max(ratios)),
                         "load": load})
            print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Digits CNN: accuracy against sparsity


def finetune_with_pruning(model, data, config, epochs: int, seed: int, lr: float = 1e-3, batch_size: int = 64):
    from modelpress.passes import GradualPruner

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    pruner = GradualPruner(model, config)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            pruner.observe()
            optimizer.step()
            pruner.step(step)
            step += 1
    model.eval()
    return pruner.finalize()


def saved_bytes(model, workdir: Path, name: str) -> int:
    path = modelpress.save(model, workdir / name)
    return (path / "weights.safetensors").stat().st_size


def bench_digits(workdir: Path, seeds: int) -> dict:
    from torch.nn.utils import prune

    sys.path.insert(0, str(HERE.parent / "demos"))  # demos/digits.py (not installed)
    from digits import DigitsCNN, accuracy, load_digits_data, train
    from modelpress.passes import GradualConfig

    torch.set_num_threads(1)
    data = load_digits_data()
    base = DigitsCNN()
    train(base, data, epochs=30)
    base_acc = accuracy(base, data)
    base_bytes = saved_bytes(base, workdir, "digits-fp32")
    steps = -(-len(data.y_train) // 64)
    rows = []
    for sparsity in (0.5, 0.7, 0.8, 0.9, 0.95):
        peer = copy.deepcopy(base)
        params = [(m, "weight") for m in peer.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
            for m, name in params:
                prune.remove(m, name)
        oneshot = modelpress.compress(copy.deepcopy(base), {"stages": [{"pass": "magnitude", "config": {
            "sparsity": sparsity, "scope": "global"}}]})
        row = {"sparsity": sparsity, "peer_oneshot": accuracy(peer, data), "oneshot": accuracy(oneshot, data),
               "oneshot_bytes": saved_bytes(oneshot, workdir, f"oneshot-{sparsity}")}
        for importance in ("taylor", "magnitude"):
            config = GradualConfig(final_sparsity=sparsity, end_step=15 * steps, every=steps // 2,
                                   importance=importance)
            accs = []
            for seed in range(seeds if sparsity == 0.9 else 1):
                tuned = finetune_with_pruning(copy.deepcopy(base), data, config, epochs=30, seed=seed)
                accs.append(accuracy(tuned, data))
            row[f"gradual_{importance}"] = accs
            row[f"gradual_{importance}_bytes"] = saved_bytes(tuned, workdir, f"gradual-{importance}-{sparsity}")
        rows.append(row)
        print(row, flush=True)
    return {"base_accuracy": base_acc, "base_bytes": base_bytes, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Report


def render(args, results: dict) -> str:
    unstructured, kernels = results.get("unstructured"), results.get("kernels")
    structured, digits = results.get("structured"), results.get("digits")
    out = [
        "# Pruning benchmark",
        "",
        f"Run {datetime.date.today()} on {cpu_name()}, torch {torch.__version__}, {args.threads} threads "
        "(digits: 1 thread).",
        "",
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_prune.py --sentences {args.sentences} "
        f"--threads {args.threads} --rounds {args.rounds}`",
        "",
    ]
    if unstructured:
        out += [
            f"## MiniLM: 50% unstructured and 2:4, no fine-tuning ({args.sentences} held-out sentences, "
            f"{args.calibration} calibration sentences)",
            "",
            "Linear bytes: the 36 encoder Linear weights as stored (kept values + positions; fp32 dense = 42.5 MB).",
            "",
            "| method | pattern | mean cos | p1 cos | overlap@10 | Linear MB | vs fp32 | compress s | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in unstructured:
            f = r["fidelity"]
            sec = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
            out.append(f"| {r['name']} | {r['pattern']} | {f['mean_cosine']:.4f} | {f['p1_cosine']:.4f} | "
                       f"{f['overlap_at_10']:.3f} | {r['bytes'] / 1e6:.1f} | {r['bytes_ratio']:.1%} | {sec} | "
                       f"{r['note']} |")
        out.append("")
    if kernels:
        out += [
            f"## Sparse CSR kernel vs dense fp32 matmul (512 rows, {args.threads} threads, best of 10)",
            "",
            "| weight | density | dense ms | CSR ms | CSR / dense | AUTO picks |",
            "|---|---|---|---|---|---|",
        ]
        for r in kernels:
            out.append(f"| {r['shape']} | {r['density']:.0%} | {r['dense_ms']:.2f} | {r['csr_ms']:.2f} | "
                       f"{r['csr_ms'] / r['dense_ms']:.2f}x | {r['auto']} |")
        out.append("")
    if structured:
        latency = results.get("latency") or []
        threads = sorted({r["threads"] for r in latency})
        loads = {r["threads"]: r.get("load", (float("nan"), float("nan"))) for r in latency}
        out += [
            "## MiniLM: structured FFN pruning (shapes really shrink, no masks)",
            "",
            "Fidelity on the held-out sentences, no fine-tuning. Kept FFN widths are rounded down to a multiple of "
            f"{FFN_MULTIPLE} (`multiple_of`: 1536 -> 1376 / 1072 / 768 neurons). Both importances give the same shapes, "
            "so one model per ratio is timed.",
            "",
            "| model | params | vs fp32 | mean cos | overlap@10 |",
            "|---|---|---|---|---|",
        ]
        for r in structured:
            f = r["fidelity"]
            fid = ("1.0000", "1.000") if f is None else (f"{f['mean_cosine']:.4f}", f"{f['overlap_at_10']:.3f}")
            out.append(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['params_ratio']:.1%} | {fid[0]} | {fid[1]} |")
        out.append("")
        if latency:
            out += [
                f"Latency: encoding {args.latency_sentences} sentences (batches of 32, tokenisation included), the "
                f"models taking turns batch by batch, {latency[0]['rounds']} rounds per thread count. Best-of-N: ratio "
                "of the fastest rounds (other jobs on this shared machine only ever add time); median: median of "
                "per-round fp32/pruned "
                "ratios [min-max]. Load average (1 min) at start and end: "
                + ", ".join(f"{t} thread{'s' * (t > 1)} {loads[t][0]:.1f} -> {loads[t][1]:.1f}" for t in threads) + ".",
                "",
                "| FFN removed | " + " | ".join(f"{t} thread{'s' * (t > 1)}: best-of-N (fp32 s / pruned s) | "
                                                f"{t} thread{'s' * (t > 1)}: median [min-max]" for t in threads) + " |",
                "|---|" + "---|---|" * len(threads),
            ]
            by = {(r["ratio"], r["threads"]): r for r in latency}
            for ratio in sorted({r["ratio"] for r in latency}):
                cells = []
                for t in threads:
                    r, f = by[(ratio, t)], by[(0.0, t)]
                    cells += [f"{r['best_speedup']:.2f}x ({f['best_s']:.2f} / {r['best_s']:.2f})",
                              f"{r['median_speedup']:.2f}x [{r['range'][0]:.2f}-{r['range'][1]:.2f}]"]
                out.append(f"| {ratio:.0%} | " + " | ".join(cells) + " |")
            out += ["", "Where best-of-N and the median disagree, or the [min-max] range is wide, other jobs on the "
                    "machine interfered; rerun `--parts latency` on a quiet machine. The FFN is about two thirds of "
                    "MiniLM's matmul work (per token and layer: 1.18 M of 1.77 M multiply-adds), so removing 30% of "
                    "its neurons bounds the gain at about 1.25x.", ""]
    if digits:
        base = digits["base_accuracy"]
        out += [
            f"## Digits CNN: test accuracy vs sparsity (fp32 {100 * base:.2f}%, {digits['base_bytes'] / 1e3:.1f} KB "
            "weights file; 360 test images, one image = 0.28 points)",
            "",
            "Global unstructured sparsity over every Conv2d and Linear weight. Gradual: 30 epochs of Adam "
            "(lr 1e-3), sparsity rising on the cubic schedule over the first 15, masks updated every half epoch; "
            f"at 90% the median of {args.seeds} fine-tuning seeds [all runs].",
            "",
            "| sparsity | torch prune L1, no fine-tune | modelpress magnitude, no fine-tune | gradual Taylor | "
            "gradual magnitude | stored KB (gradual Taylor) |",
            "|---|---|---|---|---|---|",
        ]
        for r in digits["rows"]:
            def acc(values):
                if len(values) == 1:
                    return f"{100 * values[0]:.2f}%"
                return f"{100 * statistics.median(values):.2f}% [{', '.join(f'{100 * v:.2f}' for v in values)}]"
            out.append(f"| {r['sparsity']:.0%} | {100 * r['peer_oneshot']:.2f}% | {100 * r['oneshot']:.2f}% | "
                       f"{acc(r['gradual_taylor'])} | {acc(r['gradual_magnitude'])} | "
                       f"{r['gradual_taylor_bytes'] / 1e3:.1f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--latency-sentences", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parts", default="unstructured,kernels,structured,latency,digits",
                        help="what to run; parts not run keep their results from results_prune.json")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results_prune.md alone")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    torch.set_num_threads(args.threads)
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() and not args.no_write else {}
    if parts & {"unstructured", "structured", "latency"}:
        encoder = modelpress.load_sentence_encoder("minilm")
        split = corpus_splits(n_eval=args.sentences, n_calib=args.calibration)
        sentences, calibration = list(split.evaluation), list(split.calibration)
        if parts & {"unstructured", "structured"}:
            reference = encoder.encode(sentences)
        if "unstructured" in parts:
            results["unstructured"] = bench_unstructured(encoder, sentences, reference, calibration, args.threads)
        if "structured" in parts:
            results["structured"] = bench_structured(encoder, sentences, reference, calibration)
        if "latency" in parts:
            results["latency"] = bench_latency(encoder, sentences[:args.latency_sentences],
                                               sorted({1, args.threads}), args.rounds)
    if "kernels" in parts:
        results["kernels"] = bench_kernels(args.threads)
    if "digits" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            results["digits"] = bench_digits(Path(tmp), args.seeds)
    table = render(args, results)
    print(table)
    if not args.no_write:
        RESULTS.write_text(table + "\n")
        RESULTS_JSON.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
