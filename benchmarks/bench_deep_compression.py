"""Deep Compression on scikit-learn's digits: each stage's size and accuracy, next to the paper's.

For a LeNet-300-100-style MLP and a LeNet-5-style CNN (demos/digits.py), trained here
for 40 epochs on one thread, the pipeline of `modelpress.pipelines.deep_compression` runs: pruning with
retraining -> k-means weight sharing -> centroid fine-tuning -> entropy coding -> float16 biases.
Every stage is saved, reloaded and evaluated on the 360 test images. Sizes are the bytes of the
stored arrays (the unit of the paper's tables); the last column adds the container's framing
(safetensors header + JSON manifest).

The paper's claim, ~40x smaller within half a point of accuracy, is a claim about the method, so
it is measured over several seeds (model initialisation and batch order) and on each float path
a CPU may take: `--float-paths default avx2 native` reruns the seeds in a child process per path
(ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA; `native` leaves both unset). One test image is 0.28
points, so a single run moves in steps of 0.28; the mean over seeds is the figure to compare.
tests/test_deep_compression.py checks one seed against a looser bound measured from these runs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_deep_compression.py --seeds 0 1 2 3 4 5 6 7 8 9 \
        --float-paths default avx2 native --out benchmarks/results_deep_compression.md
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demos"))  # demos/digits.py (not installed)
from machine import cpu_name  # noqa: E402

from modelpress.pipelines.deep_compression import DeepCompressionPlan, TrainingSet, deep_compress, fp32_bytes  # noqa: E402
from digits import DigitsLeNet5, DigitsMLP, accuracy, load_digits_data, train  # noqa: E402

PLANS = {
    "LeNet-300-100 (MLP)": (DigitsMLP, DeepCompressionPlan(
        sparsity={"fc1": 0.92, "fc2": 0.95, "fc3": 0.8}, bits={"fc1": 3, "fc2": 3, "fc3": 4}, centroid_lr=1e-4)),
    "LeNet-5 (CNN)": (DigitsLeNet5, DeepCompressionPlan(
        sparsity={"conv1": 0.3, "conv2": 0.6, "fc1": 0.95, "fc2": 0.9, "fc3": 0.8},
        bits={"conv1": 6, "conv2": 5, "fc1": 3, "fc2": 3, "fc3": 4}, centroid_lr=1e-4)),
}

# Han, Mao & Dally, "Deep Compression", ICLR 2016, Table 1 (MNIST, 28x28 inputs).
PAPER = {
    "LeNet-300-100 (MLP)": "1070 KB -> 27 KB, 40x; top-1 error 1.64% -> 1.58%",
    "LeNet-5 (CNN)": "1720 KB -> 44 KB, 39x; top-1 error 0.80% -> 0.74%",
}

# The instruction set torch's kernels (ATen) and oneDNN may use: what another CPU would take.
FLOAT_PATHS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {},
}


def measure(seeds: list[int], epochs: int) -> dict:
    """Every stage of every seed of both models, on this process's float path."""
    data = load_digits_data()
    runs = {}
    for title, (cls, plan) in PLANS.items():
        runs[title] = []
        for seed in seeds:
            model = cls(seed)
            train(model, data, epochs=epochs, seed=seed)
            dense, baseline = accuracy(model, data), fp32_bytes(model)  # before the pipeline changes the model
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                _, results = deep_compress(model, TrainingSet(data.x_train, data.y_train), plan, lambda: cls(None),
                                           Path(tmp), lambda m: accuracy(m, data))
            runs[title].append({"seed": seed, "dense": dense, "baseline": baseline,
                                "seconds": time.perf_counter() - start,
                                "stages": [[r.stage, r.accuracy, r.bytes, r.file_bytes] for r in results]})
    return {"capability": torch.backends.cpu.get_cpu_capability(), "runs": runs}


def measure_on(path: str, seeds: list[int], epochs: int) -> dict:
    """`measure` in a child process whose torch takes the given float path (fixed at torch's start)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env |= FLOAT_PATHS[path]
    argv = [sys.executable, __file__, "--json", "--epochs", str(epochs), "--seeds", *map(str, seeds)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def loss_points(run: dict) -> float:
    return 100 * (run["dense"] - run["stages"][-1][1])


def render(measured: dict[str, dict]) -> list[str]:
    first = next(iter(measured))
    lines = []
    for title in PLANS:
        _, plan = PLANS[title]
        lines += [f"### {title}", "", f"Paper (MNIST): {PAPER[title]}.", "",
                  f"Plan: sparsity {plan.sparsity}, index bits {plan.bits}.", ""]
        run0 = measured[first]["runs"][title][0]
        base = run0["baseline"]
        lines += [f"Seed {run0['seed']}, {first} float path ({run0['seconds']:.0f} s for all stages):", "",
                  "| stage | test accuracy | stored bytes | ratio vs fp32 | with framing |", "|---|---|---|---|---|"]
        for stage, acc, nbytes, file_bytes in run0["stages"]:
            lines.append(f"| {stage} | {100 * acc:.2f}% | {nbytes:,} | {base / nbytes:.1f}x | "
                         f"{file_bytes:,} ({base / file_bytes:.1f}x) |")
        paths = list(measured)
        lines += ["", "Every seed, final stage: fp32 accuracy -> final accuracy (points lost; negative: gained):", "",
                  "| seed | " + " | ".join(f"{p} ({measured[p]['capability']})" for p in paths) + " |",
                  "|---|" + "---|" * len(paths)]
        for i, run in enumerate(measured[first]["runs"][title]):
            cells = []
            for p in paths:
                r = measured[p]["runs"][title][i]
                cells.append(f"{100 * r['dense']:.2f}% -> {100 * r['stages'][-1][1]:.2f}% ({loss_points(r):+.2f})")
            lines.append(f"| {run['seed']} | " + " | ".join(cells) + " |")
        lines += ["", "| float path | mean points lost | worst run | ratio vs fp32 |", "|---|---|---|---|"]
        for p in paths:
            runs = measured[p]["runs"][title]
            losses = [loss_points(r) for r in runs]
            ratios = [r["baseline"] / r["stages"][-1][2] for r in runs]
            lines.append(f"| {p} | {statistics.mean(losses):+.2f} | {max(losses):+.2f} | "
                         f"{min(ratios):.1f}-{max(ratios):.1f}x |")
        every = [loss_points(r) for p in paths for r in measured[p]["runs"][title]]
        lines += ["", f"Over all {len(every)} runs: mean {statistics.mean(every):+.2f} points lost, worst "
                      f"{max(every):+.2f} (one test image is 0.28 points).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--epochs", type=int, default=40, help="dense training epochs")
    parser.add_argument("--float-paths", nargs="+", choices=list(FLOAT_PATHS), default=["native"],
                        help="instruction sets to run on (a child process each, except native alone)")
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child's answer to measure_on
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.json:
        print(json.dumps(measure(args.seeds, args.epochs)))
        return
    if args.float_paths == ["native"]:
        measured = {"native": measure(args.seeds, args.epochs)}
    else:
        measured = {p: measure_on(p, args.seeds, args.epochs) for p in args.float_paths}
    header = ["# Deep Compression on digits", "",
              f"`{' '.join(['HF_HUB_OFFLINE=1 .venv/bin/python', *sys.argv])}` on {cpu_name()}, "
              f"torch {torch.__version__}, one thread.", ""]
    text = "\n".join(header + render(measured))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
