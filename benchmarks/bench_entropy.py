"""Entropy coding of quantised MiniLM weights in checkpoints: bytes saved and load time, per preset.

Each preset's model is saved twice, with and without entropy coding of its integer arrays
(`modelpress.formats.entropy`), and both checkpoints are loaded back and checked to give the same
embeddings.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_entropy.py [--presets int8 int4 int3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

from modelpress.compress import compress  # noqa: E402
from modelpress.evaluate.size import folder_bytes  # noqa: E402
from modelpress.formats.checkpoint import load, save  # noqa: E402
from modelpress.formats.hf import load_sentence_encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["int8", "int4", "int3"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    sentences = ["entropy coding turns skewed codes into saved bytes", "a second sentence to compare"]
    print(f"`HF_HUB_OFFLINE=1 .venv/bin/python {' '.join(sys.argv)}` on {cpu_name()}, torch {torch.__version__}\n")
    print("| preset | weights file, plain | entropy-coded | saved | load s plain / coded | same embeddings |")
    print("|---|---|---|---|---|---|")
    for name in args.presets:
        model = compress(load_sentence_encoder("minilm"), name)
        with tempfile.TemporaryDirectory() as tmp:
            plain = save(model, Path(tmp) / "plain", entropy=False)
            coded = save(model, Path(tmp) / "coded")
            times, outputs = [], []
            for path in (plain, coded):
                start = time.perf_counter()
                loaded = load(path)
                times.append(time.perf_counter() - start)
                outputs.append(loaded.encode(sentences))
            a, b = folder_bytes(plain), folder_bytes(coded)
        print(f"| {name} | {a:,} | {b:,} | {100 * (1 - b / a):.1f}% | {times[0]:.2f} / {times[1]:.2f} | "
              f"{torch.equal(outputs[0], outputs[1])} |", flush=True)


if __name__ == "__main__":
    main()
