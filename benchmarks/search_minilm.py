"""The joint search on MiniLM at 1/8 of fp32's bytes, against the best hand-made recipe of results_combined.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_minilm.py RUN_DIR [--space gptq-small] [--candidates 12]

1. `modelpress search minilm --budget-mb <fp32 bytes / 8> --metric cos --out RUN_DIR` (resumes a killed run);
2. the chosen recipe compressed again from RUN_DIR/chosen.yaml, saved, and scored as bench_combined.py scores
   its rows: mean cosine and overlap@10 on the same 1000 held-out sentences (corpus_splits(1000, 128)), and the
   stored arrays' bytes of the saved checkpoint (entropy-coded codes, float16 plain tensors);
3. RUN_DIR/minilm_figures.json, and the HTML report RUN_DIR/report.html.

The search never sees those 1000 sentences: it measures layers and validates candidates on corpus sentences
after the first 2000 (what `compress --eval` reports on).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from modelpress.calibration import calibration_sentences
from modelpress.cli import main as cli_main
from modelpress.compress import compress
from modelpress.data.corpus import corpus_splits
from modelpress.evaluate.fidelity import fidelity
from modelpress.evaluate.size import size_report
from modelpress.formats.checkpoint import save
from modelpress.formats.models import load_model, resolve_source
from modelpress.pipelines.deep_compression import fp32_bytes, stored_bytes
from modelpress.recipe import Recipe

HAND_MADE = {"recipe": "gptq4 + emb3", "stored_mb": 10.77, "mean_cosine": 0.9798, "overlap_at_10": 0.844}


def encode(model, sentences, batch=64):
    with torch.inference_mode():
        return torch.cat([model(**model.tokenize(sentences[i:i + batch])) for i in range(0, len(sentences), batch)])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--space", default="gptq-small")
    ap.add_argument("--sensitivity-sentences", type=int, default=96)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--options", help="only these labels of the space, comma-separated")
    ap.add_argument("--sentences", type=int, default=256, help="validation sentences")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=128)
    args = ap.parse_args()
    model = load_model(resolve_source("minilm"))
    budget = fp32_bytes(model) // 8
    start = time.time()
    argv = ["search", "minilm", "--budget-mb", f"{budget / 1e6:.6f}", "--metric", "cos", "--out", args.run,
            "--space", args.space, "--sensitivity-sentences", str(args.sensitivity_sentences), "--candidates", str(args.candidates), "--jobs", str(args.jobs),
            "--report", str(Path(args.run) / "report.html")]
    if args.calibration:
        argv += ["--calibration", str(args.calibration)]
    if args.options:
        argv += ["--options", args.options]
    argv += ["--sentences", str(args.sentences)]
    code = cli_main(argv)
    if code:
        return code
    searched_s = time.time() - start
    recipe = Recipe.from_file(Path(args.run) / "chosen.yaml")
    calibration = calibration_sentences(args.calibration) if args.calibration else None
    compressed = compress(load_model(resolve_source("minilm")), recipe, calibration=calibration)
    path = save(compressed, Path(args.run) / "chosen-checkpoint", recipe, overwrite=True)
    payload, _ = stored_bytes(path)
    sentences = list(corpus_splits(1000, 128).evaluation)
    f = fidelity(encode(model, sentences), encode(compressed, sentences), n_queries=200)
    search = json.loads((Path(args.run) / "search.json").read_text())
    figures = {
        "fp32_bytes": fp32_bytes(model), "budget_bytes": budget,
        "chosen_size_report_bytes": size_report(compressed).bytes, "chosen_stored_bytes": payload,
        "heldout_1000": {"mean_cosine": f.mean_cosine, "p1_cosine": f.p1_cosine, "overlap_at_10": f.overlap_at_10},
        "hand_made": HAND_MADE, "validated_candidates": len(search["candidates"]),
        "front_points": sum(bool(p.get("front")) for p in search["candidates"]),
        "front_size_fidelity_points": sum(bool(p.get("front_size_fidelity")) for p in search["candidates"]),
        "search_seconds": searched_s,
    }
    (Path(args.run) / "minilm_figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
