"""GPTQ benchmark on the bundled all-MiniLM-L6-v2: round-to-nearest (min-max and MSE-searched
ranges) against GPTQ (with and without act_order) and AWQ at the same size, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gptq.py [--sentences 2000] [--calibration 128]

Every method quantises the Linear layers with its technique (asymmetric, groups of 64) and the
embedding tables with the same-bit RTN MSE stage, so all rows of one bit width have the same size.
Fidelity is against fp32 on `corpus_splits(2000, 128).evaluation` held-out sentences; GPTQ
and AWQ calibrate on `calibration_sentences(128)`, which the script checks are disjoint from them.

Each method runs in its own subprocess, so that its memory is measured alone: after loading the
model and building the calibration sentences, the worker resets the kernel's peak-RSS mark
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), runs `compress`, and reads the peak back
(`VmHWM` in /proc/self/status). "peak +MB" is that peak minus the resident size just before
`compress`: everything compression and calibration allocated, torch's allocations included
(tracemalloc would miss those). Where clear_refs is unavailable the worker falls back to
`ru_maxrss` (the process's lifetime peak, which hides a `compress` peak lower than the loading
peak); the table says which was used. Wall and CPU seconds are for the whole `compress` call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results_gptq.md"

# (name, Linear stage config apart from bits/symmetric/group_size)
METHODS = [
    ("RTN min-max", {"pass": "rtn", "config": {"search": "minmax"}}),
    ("RTN MSE search", {"pass": "rtn", "config": {"search": "mse"}}),
    ("GPTQ", {"pass": "gptq", "config": {"search": "mse"}}),
    ("GPTQ act_order", {"pass": "gptq", "config": {"search": "mse", "act_order": True}}),
    ("AWQ", {"pass": "awq", "config": {"search": "mse"}}),
]
CALIBRATED = ("gptq", "awq")  # the methods that take calibration sentences
GROUP_SIZE = 64


def stages(method: dict, bits: int) -> tuple[dict, dict]:
    """The two stages of every method's recipe: its Linear stage, then the shared embedding stage."""
    base = {"bits": bits, "symmetric": False, "group_size": GROUP_SIZE}
    linear = {"pass": method["pass"], "targets": {"types": ["Linear"]}, "config": {**base, **method["config"]}}
    embedding = {"pass": "rtn", "targets": {"types": ["Embedding"]}, "config": {**base, "search": "mse"}}
    return linear, embedding


# ------------------------------------------------------------------------------------ worker


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec: dict, embeddings_path: str) -> dict:
    """Compress one model as `spec` says, measure time and memory, write its evaluation embeddings."""
    import resource

    from safetensors.torch import save_file

    import modelpress
    from modelpress.calibration import calibration_sentences
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.size import size_report

    torch.set_num_threads(spec["threads"])
    model = modelpress.load_sentence_encoder("minilm")
    evaluation = list(corpus_splits(spec["sentences"], spec["calibration"]).evaluation)
    calibration = calibration_sentences(spec["calibration"]) if spec["method"]["pass"] in CALIBRATED else None
    linear, embedding = stages(spec["method"], spec["bits"])
    # The recipe [linear, embedding] applied as two compress() calls (the same result: stages run in
    # order), so that the Linear stage - calibration and GPTQ - is measured on its own.
    before_kb = _status_kb("VmRSS")
    exact = _reset_peak() and before_kb is not None
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    modelpress.compress(model, {"name": "linear", "stages": [linear]}, calibration=calibration)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if exact:
        peak_growth_kb = _status_kb("VmHWM") - before_kb
    else:  # peak of the whole process: an upper bound unless loading peaked higher than compress
        peak_growth_kb = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - (before_kb or maxrss_before))
    log = list(modelpress.provenance(model).log)
    embedding_wall = time.perf_counter()
    modelpress.compress(model, {"name": "embedding", "stages": [embedding]})
    embedding_wall = time.perf_counter() - embedding_wall
    save_file({"embeddings": model.encode(evaluation).contiguous()}, embeddings_path)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_growth_mb": peak_growth_kb * 1024 / 1e6,
        "rss_before_mb": (before_kb or 0) * 1024 / 1e6,
        "peak_method": "VmHWM after clear_refs" if exact else "ru_maxrss",
        "embedding_wall_s": embedding_wall,
        "bytes": size_report(model).bytes,
        "log": [line for line in log if "skipped" in line],
    }


# ------------------------------------------------------------------------------------ parent


from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

def run_worker(spec: dict, workdir: Path) -> tuple[dict, torch.Tensor]:
    from safetensors.torch import load_file

    path = workdir / "embeddings.safetensors"
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec), "--embeddings", str(path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(str(path))["embeddings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results_gptq.md alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--embeddings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.embeddings)))
        return

    import modelpress
    from modelpress.calibration import calibration_sentences
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.fidelity import fidelity
    from modelpress.evaluate.size import folder_bytes

    torch.set_num_threads(args.threads)
    evaluation = list(corpus_splits(args.sentences, args.calibration).evaluation)
    overlap = set(evaluation) & set(calibration_sentences(args.calibration))
    assert not overlap, f"{len(overlap)} calibration sentences are also evaluation sentences"
    encoder = modelpress.load_sentence_encoder("minilm")
    reference = encoder.encode(evaluation)
    fp32_bytes = folder_bytes(encoder.source)
    del encoder
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in [int(b) for b in args.bits.split(",")]:
            for name, method in METHODS:
                spec = {"method": method, "bits": bits, "threads": args.threads, "sentences": args.sentences,
                        "calibration": args.calibration}
                stats, got = run_worker(spec, Path(tmp))
                f = fidelity(reference, got)
                row = {"name": name, "bits": bits, **stats, "fidelity": f.to_dict()}
                rows.append(row)
                print(f"{bits}-bit {name:16s} {stats['bytes'] / 1e6:5.1f} MB  cos {f.mean_cosine:.4f}  "
                      f"p1 {f.p1_cosine:.4f}  ov@10 {f.overlap_at_10:.3f}  {stats['wall_s']:5.1f} s  "
                      f"peak +{stats['peak_growth_mb']:.0f} MB", flush=True)
    table = render(rows, args, fp32_bytes, load_start, os.getloadavg()[0])
    print(table)
    if not args.no_write:
        RESULTS.write_text(table + "\n")


def render(rows, args, fp32_bytes: int, load_start: float, load_end: float) -> str:
    lines = [
        f"Run {datetime.date.today()} on {cpu_name()}, {args.threads} threads, torch {torch.__version__}; "
        f"load average {load_start:.1f} at start, {load_end:.1f} at end (the machine is shared).",
        "",
        f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gptq.py --sentences {args.sentences} "
        f"--calibration {args.calibration} --threads {args.threads}`",
        "",
        f"all-MiniLM-L6-v2; Linear layers by each method, asymmetric, groups of {GROUP_SIZE}; embeddings by "
        f"RTN MSE at the same bits, so sizes match. Fidelity against fp32 on {args.sentences} held-out sentences "
        f"(overlap@10 over 200 queries). GPTQ and AWQ calibrate on {args.calibration} corpus sentences disjoint from "
        "them. Time and memory are those of the Linear stage (for GPTQ: calibration capture and quantisation), "
        "run as its own `compress` call: wall and CPU seconds, and peak resident memory during the call minus "
        f"the resident memory just before it (fp32 weights file: {fp32_bytes / 1e6:.1f} MB; measured with "
        f"{rows[0]['peak_method']}, one subprocess per row). Resident memory includes freed memory that "
        "glibc keeps in its heap rather than returning it, so it over-states what is live at the peak.",
        "",
        "| bits | method | weights MB | mean cos | p1 cos | overlap@10 | Linear stage wall s | CPU s | peak +MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fidelity"]
        lines.append(
            f"| {r['bits']} | {r['name']} | {r['bytes'] / 1e6:.1f} | {f['mean_cosine']:.4f} | {f['p1_cosine']:.4f} | "
            f"{f['overlap_at_10']:.3f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_growth_mb']:.0f} |"
        )
    lines += ["", "Embedding stage (the same RTN MSE for every row), wall s: "
              + ", ".join(f"{r['embedding_wall_s']:.1f}" for r in rows) + "."]
    lines += ["", *checks(rows, fp32_bytes)]
    skipped = sorted({line for r in rows for line in r["log"]})
    if skipped:
        lines += ["", "Skipped layers: " + "; ".join(skipped)]
    return "\n".join(lines)


def checks(rows, fp32_bytes: int) -> list[str]:
    """The issue's acceptance targets, each with the measured numbers."""
    by = {(r["bits"], r["name"]): r for r in rows}
    out = []
    if (4, "GPTQ") in by and (4, "RTN MSE search") in by:
        g, m = by[4, "GPTQ"]["fidelity"], by[4, "RTN MSE search"]["fidelity"]
        ok = g["mean_cosine"] > m["mean_cosine"] and g["overlap_at_10"] > m["overlap_at_10"]
        out.append(f"- 4-bit g64: GPTQ beats RTN MSE on mean cosine ({g['mean_cosine']:.4f} vs {m['mean_cosine']:.4f}) "
                   f"and overlap@10 ({g['overlap_at_10']:.3f} vs {m['overlap_at_10']:.3f}): {'yes' if ok else 'NO'}")
    if (3, "GPTQ") in by:
        cos = by[3, "GPTQ"]["fidelity"]["mean_cosine"]
        out.append(f"- 3-bit g64: GPTQ mean cosine {cos:.4f} >= 0.93: {'yes' if cos >= 0.93 else 'NO'}")
    gptq = [r for r in rows if r["name"].startswith("GPTQ")]
    if gptq:
        worst_wall = max(r["wall_s"] for r in gptq)
        worst_peak = max(r["peak_growth_mb"] for r in gptq)
        out.append(f"- GPTQ calibration wall time, slowest row: {worst_wall:.1f} s <= 60 s: "
                   f"{'yes' if worst_wall <= 60 else 'NO'}")
        out.append(f"- GPTQ peak memory growth, largest row: {worst_peak:.0f} MB <= 2 x {fp32_bytes / 1e6:.1f} MB: "
                   f"{'yes' if worst_peak * 1e6 <= 2 * fp32_bytes else 'NO'}")
    return out


if __name__ == "__main__":
    main()
