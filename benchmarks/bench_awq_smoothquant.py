"""AWQ and SmoothQuant on the bundled all-MiniLM-L6-v2, written to benchmarks/results_awq_smoothquant.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_awq_smoothquant.py [--part awq|w8a8|all]
        [--sentences 2000] [--calibration 128] [--threads 2] [--rounds 7]

Part `awq`: bench_gptq.py's comparison (RTN min-max, RTN MSE search, GPTQ, GPTQ act_order, AWQ;
Linear layers asymmetric g64, embeddings RTN MSE at the same bits), at 4 and 3 bits, each method in
its own subprocess, through bench_gptq's own worker and table.

Part `w8a8`: fp32, the `w8a8` preset, `w8a8-smooth`, and the ablations that explain it (FFN output
with a range per token but no smoothing; the FFN output weight-only instead; smoothing every
Linear; w8a8 with an identity input multiply on every Linear, which prices the explicit multiply),
plus ONNX Runtime's dynamic per-channel QInt8 as the reference the issue names. Fidelity on
held-out sentences; latency is encoding `--latency-sentences` sentences (batches of 32) at
`--threads` threads, the models taking turns batch by batch, reported as the median of per-round
ratios to fp32 with their range: the machine is shared and noisy, so absolute seconds mean little
and the ratios are what to read.

Running one part keeps the other part's last section in the results file.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results_awq_smoothquant.md"
TITLES = {"awq": "## AWQ vs RTN and GPTQ (weight-only, 4 and 3 bits, g64)",
          "w8a8": "## W8A8: w8a8 vs w8a8-smooth, fidelity and latency vs fp32"}

sys.path.insert(0, str(ROOT))
from machine import cpu_name  # noqa: E402
from timing import time_batch_interleaved  # noqa: E402

FFN_OUTPUT = {"types": ["Linear"], "include": ["*.layer.*.output.dense"], "ignore": ["*.attention.output.dense"]}


def w8a8_recipes() -> list[tuple[str, dict | str, bool]]:
    """(row name, recipe, needs calibration) for every modelpress row of the W8A8 table."""
    embedding = {"pass": "rtn", "targets": {"types": ["Embedding"]}, "config": {"bits": 8}, "optional": True}
    ffn_weight_only = {"pass": "rtn", "targets": FFN_OUTPUT, "config": {"bits": 8}}
    smoothed = ("*.attention.self.value", "*.attention.output.dense", "*.intermediate.dense")

    def dyn(alpha=None, overrides=None):
        return {"pass": "dynamic_int8", "targets": {"types": ["Linear"]}, "config": {"smooth_alpha": alpha},
                "overrides": overrides or {}}

    return [
        ("modelpress w8a8", "w8a8", False),
        ("modelpress w8a8-smooth", "w8a8-smooth", True),
        ("ablation: w8a8, FFN output a range per token, no smoothing",
         {"name": "ffn-token", "stages": [dyn(overrides={"*.layer.*.output.dense": {"activations": "token"},
                                                          "*.attention.output.dense": {"activations": "tensor"}}),
                                          embedding]}, False),
        ("ablation: w8a8-smooth with FFN output weight-only int8 instead",
         {"name": "ffn-wo", "stages": [ffn_weight_only, dyn(overrides={p: {"smooth_alpha": 0.6} for p in smoothed}),
                                       embedding]}, True),
        ("ablation: w8a8, every Linear smoothed (alpha 0.6)",
         {"name": "smooth-all", "stages": [dyn(0.6), embedding]}, True),
    ]


# ------------------------------------------------------------------------------------ part awq


def part_awq(args) -> str:
    import bench_gptq

    from modelpress.calibration import calibration_sentences
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.fidelity import fidelity
    from modelpress.evaluate.size import folder_bytes
    from modelpress.formats.hf import load_sentence_encoder

    evaluation = list(corpus_splits(args.sentences, args.calibration).evaluation)
    assert not set(evaluation) & set(calibration_sentences(args.calibration)), "calibration overlaps evaluation"
    encoder = load_sentence_encoder("minilm")
    reference = encoder.encode(evaluation)
    fp32_bytes = folder_bytes(encoder.source)
    del encoder
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (4, 3):
            for name, method in bench_gptq.METHODS:
                spec = {"method": method, "bits": bits, "threads": args.threads, "sentences": args.sentences,
                        "calibration": args.calibration}
                stats, got = bench_gptq.run_worker(spec, Path(tmp))
                f = fidelity(reference, got)
                rows.append({"name": name, "bits": bits, **stats, "fidelity": f.to_dict()})
                print(f"{bits}-bit {name:16s} cos {f.mean_cosine:.4f} ov@10 {f.overlap_at_10:.3f} "
                      f"{stats['wall_s']:.1f} s", flush=True)
    table = bench_gptq.render(rows, args, fp32_bytes, load_start, os.getloadavg()[0])
    table = table.replace("benchmarks/bench_gptq.py", "benchmarks/bench_awq_smoothquant.py --part awq")
    return table + "\n\n" + "\n".join(awq_checks(rows))


def awq_checks(rows) -> list[str]:
    by = {(r["bits"], r["name"]): r["fidelity"] for r in rows}
    out = []
    for bits in (4, 3):
        if (bits, "AWQ") in by and (bits, "RTN MSE search") in by:
            a, m, g = by[bits, "AWQ"], by[bits, "RTN MSE search"], by.get((bits, "GPTQ"))
            out.append(f"- {bits}-bit g64: AWQ mean cosine {a['mean_cosine']:.4f} / overlap@10 {a['overlap_at_10']:.3f} "
                       f"vs clip-search RTN {m['mean_cosine']:.4f} / {m['overlap_at_10']:.3f}"
                       + (f" and GPTQ {g['mean_cosine']:.4f} / {g['overlap_at_10']:.3f}" if g else ""))
    return out


# ------------------------------------------------------------------------------------ part w8a8


def part_w8a8(args) -> str:
    import modelpress
    from modelpress.calibration import calibration_sentences
    from modelpress.encodings.scaled import ChannelScaledTensor
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.fidelity import fidelity
    from modelpress.evaluate.size import folder_bytes
    from modelpress.formats.checkpoint import WEIGHTS
    from modelpress.nn import CompressedLinear

    torch.set_num_threads(args.threads)
    encoder = modelpress.load_sentence_encoder("minilm")
    evaluation = list(corpus_splits(args.sentences, args.calibration).evaluation)
    calibration = calibration_sentences(args.calibration)
    assert not set(evaluation) & set(calibration), "calibration overlaps evaluation"
    reference = None if args.latency_only else encoder.encode(evaluation)
    models = [("fp32 (PyTorch)", encoder.encode, folder_bytes(encoder.source), "")]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe, calibrated in w8a8_recipes():
            model = modelpress.compress(copy.deepcopy(encoder), recipe, calibration=calibration if calibrated else None)
            path = modelpress.save(model, Path(tmp) / name.replace(" ", "_").replace(":", "").replace(",", ""))
            models.append((name, model.encode, (path / WEIGHTS).stat().st_size, ""))
        # The explicit multiply's price: w8a8 with 1/s = 1 on every Linear (the same numbers, one more pass over x).
        priced = modelpress.compress(copy.deepcopy(encoder), "w8a8")
        for module in priced.modules():
            if isinstance(module, CompressedLinear):
                module.encoding = ChannelScaledTensor(module.encoding, torch.ones(module.in_features))
                module.release()
        models.append(("cost probe: w8a8 + identity input multiply on every Linear", priced.encode, 0, ""))
        n_torch = len(models)
        if not args.no_peers:
            import peers

            peer = peers.ort_dynamic_int8(encoder, per_channel=True, weight_type="QInt8", workdir=Path(tmp))
            models.append((peer.name, peer.encode, peer.size_bytes, peer.note))
        rows = []
        for name, encode, size, note in models:
            f = None if args.latency_only else fidelity(reference, encode(evaluation)).to_dict()
            rows.append({"name": name, "bytes": size, "fidelity": f, "note": note})
            if f:
                print(f"{name:60s} cos {f['mean_cosine']:.4f} ov@10 {f['overlap_at_10']:.3f}", flush=True)
        latency_batch = evaluation[: args.latency_sentences]
        times = time_batch_interleaved([(name, encode) for name, encode, *_ in models[:n_torch]], latency_batch,
                                       args.threads, args.rounds)
        base = {name: times[models[0][0]] for name, *_ in models[:n_torch]}
        if len(models) > n_torch:
            # ONNX Runtime's threads spin for a while after each run, which slows whatever runs next: taking
            # turns batch by batch would charge that to the PyTorch models, so ORT takes turns with fp32 whole
            # rounds at a time (as bench_quant does), and its ratio is to the fp32 times of those rounds.
            from bench_quant import time_interleaved

            peer_times = time_interleaved([models[0], *models[n_torch:]], latency_batch, args.threads, args.rounds)
            for name, *_ in models[n_torch:]:
                times[name], base[name] = peer_times[name], peer_times[models[0][0]]
    for row in rows:
        ratios = [t / b for t, b in zip(times[row["name"]], base[row["name"]])]
        row["latency_s"], row["ratio"], row["range"] = statistics.median(times[row["name"]]), statistics.median(ratios), (min(ratios), max(ratios))
        print(f"{row['name']:60s} {row['ratio']:.3f}x [{row['range'][0]:.3f}-{row['range'][1]:.3f}]", flush=True)
    return render_w8a8(rows, args, statistics.median(base[rows[0]["name"]]), load_start, os.getloadavg()[0])


def render_w8a8(rows, args, fp32_median: float, load_start: float, load_end: float) -> str:
    lines = [
        f"Run {datetime.date.today()} on {cpu_name()}, {args.threads} threads, torch {torch.__version__}; load average "
        f"{load_start:.1f} at start, {load_end:.1f} at end (the machine is shared: read the ratios, not the seconds).",
        "",
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_awq_smoothquant.py --part w8a8 "
        f"--sentences {args.sentences} --calibration {args.calibration} --threads {args.threads} --rounds {args.rounds}"
        f"{' --latency-only' if args.latency_only else ''}`",
        "",
        ("Latency only (fidelity does not depend on the thread count). " if args.latency_only else
         f"Fidelity on {args.sentences} held-out sentences (overlap@10 over 200 queries); smoothing calibrates on "
         f"{args.calibration} corpus sentences disjoint from them. ")
        + f"Latency: encoding {args.latency_sentences} sentences in batches of 32, the models taking turns batch by "
        f"batch, {args.rounds} rounds (fp32 median {fp32_median:.2f} s per round); ratio = median of per-round ratios "
        "to fp32 [min-max]. ONNX Runtime (whose threads spin after each run, slowing what runs next) takes turns "
        "with fp32 whole rounds at a time instead, its ratio taken to those fp32 rounds.",
        "",
        "| model | weights MB | mean cos | p1 cos | overlap@10 | latency vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, (lo, hi) = r["fidelity"], r["range"]
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        quality = (f"{f['mean_cosine']:.4f} | {f['p1_cosine']:.4f} | {f['overlap_at_10']:.3f}" if f else "- | - | -")
        lines.append(f"| {r['name']} | {size} | {quality} | {r['ratio']:.2f}x [{lo:.2f}-{hi:.2f}] |")
    by = {r["name"]: r for r in rows}
    smooth = by.get("modelpress w8a8-smooth")
    if smooth and smooth["fidelity"]:
        cos, ratio = smooth["fidelity"]["mean_cosine"], smooth["ratio"]
        lines += ["", f"- w8a8-smooth mean cosine {cos:.4f} >= 0.99: {'yes' if cos >= 0.99 else 'NO'}; latency "
                      f"{ratio:.3f}x fp32 <= 0.75x in the same run: {'yes' if ratio <= 0.75 else 'NO'} "
                      f"(worst round {smooth['range'][1]:.2f}x)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def write(part: str, text: str) -> None:
    begin, end = f"<!-- {part}:begin -->", f"<!-- {part}:end -->"
    doc = RESULTS.read_text() if RESULTS.exists() else "# AWQ and SmoothQuant on MiniLM\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        title = TITLES.get(part, f"## W8A8 latency only, {part.rsplit('-t', 1)[-1]} thread(s)")
        doc = doc.rstrip() + f"\n\n{title}\n\n{block}\n"
    RESULTS.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["awq", "w8a8", "all"], default="all")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-sentences", type=int, default=512)
    parser.add_argument("--no-peers", action="store_true", help="leave ONNX Runtime out of the W8A8 table")
    parser.add_argument("--latency-only", action="store_true",
                        help="W8A8 part: time only (e.g. at another --threads), into a section of its own")
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for part, fn in (("awq", part_awq), ("w8a8", part_w8a8)):
        if args.part in (part, "all"):
            text = fn(args)
            print(text, flush=True)
            if not args.no_write:
                write(f"w8a8-latency-t{args.threads}" if part == "w8a8" and args.latency_only else part, text)


if __name__ == "__main__":
    main()
