"""The joint search on MiniLM at 1/8 of fp32's bytes, against the best hand-made recipe of results_combined.md.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_minilm.py RUN_DIR [--space gptq-small] [--candidates 12]

1. `modelpress search minilm --budget-mb <fp32 bytes / 8> --metric cos --out RUN_DIR` (resumes a killed run);
2. the chosen recipe (RUN_DIR/chosen.yaml) and the hand-made "gptq4 + emb3" side by side, each compressed,
   saved and reloaded as bench_combined.py does (float16 plain tensors) and scored as it scores its rows: mean
   cosine and overlap@10 on the same 1000 held-out sentences (corpus_splits(1000, 128)), the stored arrays'
   bytes (entropy-coded codes) and the bytes as held (`size_report`, what the search's budget counts);
3. RUN_DIR/minilm_figures.json, and the HTML report RUN_DIR/report.html.

The search never sees those 1000 sentences: it measures layers and validates candidates on corpus sentences
after the first 2000 (what `compress --eval` reports on).
"""

from __future__ import annotations

import argparse
import copy
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
from modelpress.formats.checkpoint import load, save
from modelpress.formats.models import load_model, resolve_source
from modelpress.pipelines.deep_compression import fp32_bytes, stored_bytes
from modelpress.recipe import Recipe

HAND_MADE = {"recipe": "gptq4 + emb3", "stored_mb": 10.77, "mean_cosine": 0.9798, "overlap_at_10": 0.844}
HAND_MADE_STAGES = [  # bench_combined.py's "gptq4 + emb3", recompressed here side by side with the searched recipe
    {"pass": "gptq", "targets": {"types": ["Linear"]},
     "config": {"bits": 4, "symmetric": False, "group_size": 64, "search": "mse"}},
    {"pass": "rtn", "targets": {"types": ["Embedding"]},
     "config": {"bits": 3, "symmetric": False, "group_size": 64, "search": "mse"}},
]


def heldout(base, recipe, calibration, sentences, reference, out: Path) -> dict:
    """Compress `base` with `recipe`, save it as bench_combined.py saves its rows (float16 plain parameters), reload
    it and score it on the held-out sentences: bench_combined.py's figures, plus the bytes as held."""
    compressed = compress(copy.deepcopy(base), recipe, calibration=calibration)
    held = size_report(compressed).bytes
    path = save(compressed, out, recipe, overwrite=True, float_params="float16")
    payload, _ = stored_bytes(path)
    f = fidelity(reference, load(path).encode(sentences))
    return {"size_report_bytes": held, "stored_bytes": payload, "mean_cosine": f.mean_cosine,
            "p1_cosine": f.p1_cosine, "overlap_at_10": f.overlap_at_10}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--space", default="gptq-small")
    ap.add_argument("--sensitivity-sentences", type=int, default=96)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--options", help="only these labels of the space, comma-separated")
    ap.add_argument("--sentences", type=int, default=256, help="validation sentences (dev: never the held-out ones)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=128, help="candidates' GPTQ calibration (bench_combined's 128)")
    ap.add_argument("--sensitivity-calibration", type=int, default=32, help="the per-layer table's GPTQ calibration")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out sentences (bench_combined.py's 1000)")
    ap.add_argument("--only", choices=("search", "hand-made"), help="run the search and score its choice, or score "
                    "the hand-made recipe alone (two processes side by side); default: both")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_model(resolve_source("minilm"))
    budget = fp32_bytes(base) // 8
    calibration = calibration_sentences(args.calibration) if args.calibration else None
    sentences = list(corpus_splits(args.heldout, 128).evaluation)
    Path(args.run).mkdir(parents=True, exist_ok=True)
    if args.only == "hand-made":
        reference = base.encode(sentences)
        hand = Recipe.from_dict({"name": "gptq4 + emb3", "stages": HAND_MADE_STAGES})
        figures = {**heldout(base, hand, calibration, sentences, reference, Path(args.run) / "hand-ckpt"),
                   "recorded": HAND_MADE, "heldout_sentences": len(sentences)}
        out = Path(args.run) / "hand_made_figures.json"
        out.write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures, indent=1))
        return 0
    start = time.time()
    argv = ["search", "minilm", "--budget-mb", f"{budget / 1e6:.6f}", "--metric", "cos", "--out", args.run,
            "--space", args.space, "--sensitivity-sentences", str(args.sensitivity_sentences),
            "--candidates", str(args.candidates), "--jobs", str(args.jobs), "--sentences", str(args.sentences),
            "--report", str(Path(args.run) / "report.html")]
    if args.calibration:
        argv += ["--calibration", str(args.calibration)]
    if args.sensitivity_calibration:
        argv += ["--sensitivity-calibration", str(args.sensitivity_calibration)]
    if args.options:
        argv += ["--options", args.options]
    code = cli_main(argv)
    if code:
        return code
    searched_s = time.time() - start
    search = json.loads((Path(args.run) / "search.json").read_text())
    reference = base.encode(sentences)
    chosen = Recipe.from_file(Path(args.run) / "chosen.yaml")
    hand = Recipe.from_dict({"name": "gptq4 + emb3", "stages": HAND_MADE_STAGES})
    figures = {
        "fp32_bytes": fp32_bytes(base), "budget_bytes": budget, "heldout_sentences": len(sentences),
        "searched": heldout(base, chosen, calibration, sentences, reference, Path(args.run) / "chosen-ckpt"),
        "hand_made": HAND_MADE if args.only == "search" else
        {**heldout(base, hand, calibration, sentences, reference, Path(args.run) / "hand-ckpt"), "recorded": HAND_MADE},
        "chosen_dev": next(p for p in search["candidates"] if p["id"] == search["chosen"]),
        "validated_candidates": len(search["candidates"]),
        "front_points": sum(bool(p.get("front")) for p in search["candidates"]),
        "front_size_fidelity_points": sum(bool(p.get("front_size_fidelity")) for p in search["candidates"]),
        "search_seconds": searched_s,
    }
    figures["chosen_dev"].pop("per_input", None)
    (Path(args.run) / "minilm_figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
