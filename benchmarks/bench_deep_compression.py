"""Deep Compression on scikit-learn's digits: each stage's size and accuracy, next to the paper's.

For a LeNet-300-100-style MLP and a LeNet-5-style CNN (demos/digits.py), trained here
for 40 epochs on one thread, the pipeline of `modelpress.pipelines.deep_compression` runs: pruning with
retraining -> k-means weight sharing -> centroid fine-tuning -> entropy coding -> float16 biases.
Every stage is saved, reloaded and evaluated on the 360 test images. Sizes are the bytes of the
stored arrays (the unit of the paper's tables); the last column adds the container's framing
(safetensors header + JSON manifest).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_deep_compression.py --seeds 0 1 2 --out benchmarks/results_deep_compression.md
"""

from __future__ import annotations

import argparse
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


def run(seeds: list[int], epochs: int) -> list[str]:
    data = load_digits_data()
    lines = []
    for title, (cls, plan) in PLANS.items():
        lines += [f"### {title}", "", f"Paper (MNIST): {PAPER[title]}.", "",
                  f"Plan: sparsity {plan.sparsity}, index bits {plan.bits}.", ""]
        per_seed = []
        for seed in seeds:
            model = cls(seed)
            train(model, data, epochs=epochs, seed=seed)
            dense = accuracy(model, data)
            baseline = fp32_bytes(model)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                _, results = deep_compress(model, TrainingSet(data.x_train, data.y_train), plan, lambda: cls(None),
                                           Path(tmp), lambda m: accuracy(m, data))
            per_seed.append((seed, dense, baseline, results, time.perf_counter() - start))
        seed0, dense0, base0, results0, seconds0 = per_seed[0]
        lines += [f"Seed {seed0} ({seconds0:.0f} s for all stages):", "",
                  "| stage | test accuracy | stored bytes | ratio vs fp32 | with framing |", "|---|---|---|---|---|"]
        for r in results0:
            lines.append(f"| {r.stage} | {100 * r.accuracy:.2f}% | {r.bytes:,} | {base0 / r.bytes:.1f}x | "
                         f"{r.file_bytes:,} ({base0 / r.file_bytes:.1f}x) |")
        lines += ["", "Every seed (final stage):", "",
                  "| seed | fp32 accuracy | final accuracy | change (points) | ratio |", "|---|---|---|---|---|"]
        for seed, dense, base, results, _ in per_seed:
            final = results[-1]
            lines.append(f"| {seed} | {100 * dense:.2f}% | {100 * final.accuracy:.2f}% | "
                         f"{100 * (final.accuracy - dense):+.2f} | {base / final.bytes:.1f}x |")
        mean = sum(100 * (r[-1].accuracy - d) for _, d, _, r, _ in per_seed) / len(per_seed)
        lines += ["", f"Mean change over {len(per_seed)} seeds: {mean:+.2f} points (one test image is 0.28 points).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40, help="dense training epochs")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = ["# Deep Compression on digits", "",
              f"`{' '.join(['HF_HUB_OFFLINE=1 .venv/bin/python', *sys.argv])}` on {cpu_name()}, "
              f"torch {torch.__version__}.", ""]
    text = "\n".join(header + run(args.seeds, args.epochs))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
