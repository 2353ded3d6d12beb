"""MiniLM through recipes that combine structured pruning, low-rank factorisation and quantisation.

Each recipe compresses the bundled all-MiniLM-L6-v2, is saved (entropy-coded codes, float16 plain
parameters), reloaded, and compared with fp32 on held-out sentences. Size is the bytes of the
stored arrays against the fp32 model's 90.9 MB; the stages:

- `ffn`: `prune_ffn` removes FFN neurons (activation importance, least-squares refit of the output
  projection), keeping a multiple of 64 so the 4-bit groups of 64 still divide the width;
- `lr`: activation-aware `lowrank` of the named attention projections, factors 4-bit g64;
- `gptq4`: GPTQ 4-bit asymmetric g64 on every other Linear; `embN`: N-bit g64 MSE-RTN embeddings.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_combined.py [NAME ...]   (default: all)
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import modelpress
from modelpress.calibration import calibration_sentences
from modelpress.pipelines.deep_compression import fp32_bytes, stored_bytes
from modelpress.data.corpus import corpus_splits
from modelpress.evaluate.fidelity import fidelity
from modelpress.formats.checkpoint import load, save
from modelpress.formats.hf import load_sentence_encoder


def gptq(bits: int = 4, group: int = 64) -> dict:
    return {"pass": "gptq", "targets": {"types": ["Linear"]},
            "config": {"bits": bits, "symmetric": False, "group_size": group, "search": "mse"}}


def embeddings(bits: int = 3, group: int = 64) -> dict:
    return {"pass": "rtn", "targets": {"types": ["Embedding"]},
            "config": {"bits": bits, "symmetric": False, "group_size": group, "search": "mse"}}


def ffn(ratio: float) -> dict:
    return {"pass": "prune_ffn", "config": {"ratio": ratio, "importance": "activation", "reconstruct": True,
                                            "multiple_of": 64}}


def lowrank(budget: float, layers=("query", "key")) -> dict:
    return {"pass": "lowrank", "targets": {"include": [f"*.attention.self.{n}" for n in layers]},
            "config": {"budget": budget, "activation_aware": True, "bits": 4, "group_size": 64}}


RECIPES = {
    "gptq4 + emb4": [gptq(), embeddings(4)],
    "gptq4 + emb3": [gptq(), embeddings()],
    "lrQK0.9 + gptq4 + emb3": [lowrank(0.9), gptq(), embeddings()],
    "ffn-12.5% + gptq4 + emb3": [ffn(0.1), gptq(), embeddings()],
    "ffn-12.5% + lrQK0.9 + gptq4 + emb4": [ffn(0.1), lowrank(0.9), gptq(), embeddings(4)],
    "ffn-12.5% + lrQK0.9 + gptq4 + emb3": [ffn(0.1), lowrank(0.9), gptq(), embeddings()],
    "ffn-8.3% + lrQK0.9 + gptq4 + emb3": [ffn(0.05), lowrank(0.9), gptq(), embeddings()],
    "ffn-8.3% + lrK0.9 + gptq4 + emb3": [ffn(0.05), lowrank(0.9, ("key",)), gptq(), embeddings()],
}


def main() -> None:
    names = sys.argv[1:] or list(RECIPES)
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}: choose from {list(RECIPES)}")
    torch.set_num_threads(2)
    base = load_sentence_encoder("minilm")
    sentences = list(corpus_splits(1000, 128).evaluation)
    reference = base.encode(sentences)
    calibration = calibration_sentences(128)
    fp32 = fp32_bytes(base)
    print("| recipe | size vs fp32 | stored MB | mean cos | overlap@10 | compress+eval s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        model, start = copy.deepcopy(base), time.time()
        modelpress.compress(model, {"stages": RECIPES[name]}, calibration=calibration)
        with tempfile.TemporaryDirectory() as tmp:
            path = save(model, Path(tmp) / "m", float_params="float16")
            payload, _ = stored_bytes(path)
            loaded = load(path)
        f = fidelity(reference, loaded.encode(sentences))
        print(f"| {name} | {fp32 / payload:.2f}x smaller | {payload / 1e6:.2f} | {f.mean_cosine:.4f} | "
              f"{f.overlap_at_10:.3f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
