"""The joint search on SmolLM2-135M-Instruct under llm-q3's bytes, with and without the 4-bit group-32
float-minimum (Q4_1-like) formats, and the chosen recipes' held-out perplexity and checkpoint size.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_smollm2.py RUN_DIR [--budget-mb 84.40] [--candidates 10]
        [--calibration 16] [--sensitivity-calibration 4] [--jobs 2] [--baseline]

Everything the search sees is `dev` text: the first `--calibration` windows of 512 tokens calibrate the
candidates' GPTQ (the first `--sensitivity-calibration` of them the table's), the next `--sensitivity-windows`
measure each row of the table (next-token KL), the `--validation-windows` after them validate candidates.
Rows are one layer type over a range of blocks (0-9, 10-19, 20-29: 21 rows, as benchmarks/plan_llm_q3.py
measures), plus the tied embedding/output layer.

1. RUN_DIR/with-q4_1: the `llm` space (GPTQ 3/4-bit symmetric g32, 4-bit g32 with a float minimum; embedding
   8-bit per row or 4-bit g32 symmetric / float minimum);
2. RUN_DIR/without-q4_1: the same run folder's table, the space less the float-minimum 4-bit formats
   (`llm-no-q4_1`): the table is reused, only new candidates are validated;
3. for each, the chosen recipe compressed again, saved (the checkpoint folder with its tokenizer files, as
   bench_llm.py counts "file MB") and scored on 8 windows of 512 tokens of `heldout` (perplexity, vs fp32);
   with --baseline llm-q3 the same way, side by side;
4. RUN_DIR/smollm2_figures.json and each run's report.html.

The budget is the model's bytes as held (`size_report`: every tensor once, the tied embedding once), not the
file: llm-q3 holds 84.40 MB and saves to a 78.7 MB checkpoint (benchmarks/results_llm.md).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from modelpress.compress import compress
from modelpress.data.text import reference_text
from modelpress.evaluate.perplexity import score_language_model, token_windows
from modelpress.evaluate.size import size_report
from modelpress.formats.checkpoint import save
from modelpress.formats.models import load_model, resolve_source
from modelpress.presets import preset
from modelpress.report import search_report_html
from modelpress.search.joint import Budget, joint_search
from modelpress.search.space import default_space
from modelpress.search.validate import make_executor

WINDOW = 512
TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
GROUPS = [f"*.layers.{r}.{t}" for t in TYPES for r in ("[0-9]", "1[0-9]", "2[0-9]")]
FP32_HELDOUT = 16.237  # results_llm_presets.md
LLM_Q3 = {"perplexity": 17.947, "ratio": 1.1053, "weight_MB": 84.40, "file_MB": 78.7}  # results_llm*.md


def windows_of(model, split: str, window: int = WINDOW) -> torch.Tensor:
    """Every whole window of the split's text, tokenised as bench_llm.py and the search CLI tokenise it."""
    ids = torch.tensor(model.tokenizer.encode(reference_text(split), add_special_tokens=False), dtype=torch.long)
    return token_windows(ids, window, ids.numel())


def heldout_figures(base, recipe, calibration, heldout: torch.Tensor, out: Path) -> dict:
    model = compress(copy.deepcopy(base), recipe, calibration=calibration)
    path = save(model, out, recipe, overwrite=True)
    file_bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())  # weights, manifest, tokenizer
    with torch.inference_mode():
        ppl = score_language_model(model, heldout).perplexity
    shutil.rmtree(path)
    return {"size_report_bytes": size_report(model).bytes, "checkpoint_bytes": file_bytes, "perplexity": ppl}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--model", default="smollm2", help="a bundled name or a causal LM folder (smoke tests: a tiny one)")
    ap.add_argument("--window", type=int, default=WINDOW)
    ap.add_argument("--budget-mb", type=float, default=LLM_Q3["weight_MB"])
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--sensitivity-calibration", type=int, default=4)
    ap.add_argument("--sensitivity-windows", type=int, default=1)
    ap.add_argument("--validation-windows", type=int, default=2)
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", action="store_true", help="also compress and score llm-q3 side by side")
    ap.add_argument("--skip-heldout", action="store_true", help="the searches only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_source(args.model)
    base = load_model(source).eval()
    dev = windows_of(base, "dev", args.window)
    c, s, v = args.calibration, args.sensitivity_windows, args.validation_windows
    if len(dev) < c + s + v:
        raise SystemExit(f"dev holds {len(dev)} windows: fewer than {c} + {s} + {v}")
    calibration = [{"input_ids": w[None]} for w in dev[:c]]
    table_calibration = calibration[:args.sensitivity_calibration]
    sensitivity, validation = dev[c:c + s], dev[c + s:c + s + v]
    factory = functools.partial(load_model, source)
    figures: dict = {"budget_bytes": int(args.budget_mb * 1e6), "fp32_heldout": FP32_HELDOUT, "llm_q3_recorded": LLM_Q3,
                     "dev_windows": {"calibration": c, "table_calibration": args.sensitivity_calibration,
                                     "sensitivity": s, "validation": v}}
    folder = Path(args.run) / "run"
    results = {}
    for name, space in (("with-q4_1", "llm"), ("without-q4_1", "llm-no-q4_1")):
        start = time.time()

        def show(step, done, total):
            print(f"[{name}] {step}: {done}/{total} ({time.time() - start:.0f} s)", flush=True)

        budget = Budget(total_bytes=figures["budget_bytes"])
        res = joint_search(base, args.model, validation, default_space(space), budget, str(folder),
                           lambda: make_executor("process", factory, validation, True, calibration, jobs=args.jobs,
                                                 threads=args.threads, model=base),
                           causal=True, calibration=calibration, candidates=args.candidates, progress=show,
                           sensitivity_inputs=sensitivity, sensitivity_calibration=table_calibration, groups=GROUPS)
        results[name] = res
        out = Path(args.run) / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps(res.data, indent=1))
        (out / "report.html").write_text(search_report_html(res.data))
        if res.chosen is not None:
            (out / "chosen.yaml").write_text(res.chosen.to_yaml())
        points = res.data["candidates"]
        figures[name] = {
            "seconds": time.time() - start, "validated": len(points), "new_validations": res.evaluations,
            "front_points": sum(bool(p.get("front")) for p in points),
            "front_size_fidelity_points": sum(bool(p.get("front_size_fidelity")) for p in points),
            "chosen": res.data["chosen"],
            "points": [{k: p.get(k) for k in ("id", "bytes", "kl", "perplexity", "front", "front_size_fidelity")}
                       for p in points],
        }
        print(json.dumps(figures[name], indent=1), flush=True)
    if not args.skip_heldout:
        heldout = windows_of(base, "heldout", args.window)[:args.heldout_windows]
        with torch.inference_mode():
            figures["fp32_heldout_measured"] = score_language_model(base, heldout).perplexity
        for name, res in results.items():
            if res.chosen is not None:
                got = heldout_figures(base, res.chosen, calibration, heldout, Path(args.run) / f"{name}-ckpt")
                figures[name]["chosen_heldout"] = {**got, "ratio": got["perplexity"] / figures["fp32_heldout_measured"]}
                print(name, json.dumps(figures[name]["chosen_heldout"]), flush=True)
        if args.baseline:
            got = heldout_figures(base, preset("llm-q3"), calibration, heldout, Path(args.run) / "llm-q3-ckpt")
            figures["llm_q3_measured"] = {**got, "ratio": got["perplexity"] / figures["fp32_heldout_measured"]}
    (Path(args.run) / "smollm2_figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k not in ("with-q4_1", "without-q4_1")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
