"""The mixed-precision plan behind the `llm-q3` preset: per-layer sensitivity of SmolLM2-135M-Instruct
at 3 and 4 bits (symmetric groups of 32, GPTQ), measured on the `dev` text only, and a size budget
spent greedily on the 4-bit upgrades.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/plan_llm_q3.py [--model FOLDER] [--calibration 16]
        [--windows 2] [--file-mb 88.0] [--support-mb 3.6] [--out benchmarks/results_llm_q3_plan.json]

Rows are groups of layers (one layer type over a range of blocks), measured compressed together.
Calibration takes the first `--calibration` windows of 512 tokens of the dev text, sensitivity the
`--windows` windows after them (disjoint). The budget is for the whole checkpoint: `--file-mb` less
the support files (`--support-mb`: tokenizer.json is 3.5 MB uncompressed), the 8-bit tied
embedding/output layer and the norms; what is left is the blocks' Linear layers' budget.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from modelpress.calibration import text_windows
from modelpress.data.text import reference_text
from modelpress.passes.gptq import GPTQConfig
from modelpress.presets import preset
from modelpress.recipe import Recipe, Stage
from modelpress.search import lm_layer_sensitivity, mixed_precision_recipe

from quality_llm_presets import load  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

WINDOW = 512
TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
RANGES = {1: ["*"], 3: ["[0-9]", "1[0-9]", "2[0-9]"], 6: ["[0-4]", "[5-9]", "1[0-4]", "1[5-9]", "2[0-4]", "2[5-9]"]}


def groups(ranges: int) -> list[str]:
    """One name pattern per layer type and block range (SmolLM2's 30 blocks): what one row measures."""
    return [f"model.layers.{r}.{t}" for t in TYPES for r in RANGES[ranges]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--file-mb", type=float, default=88.0)
    parser.add_argument("--support-mb", type=float, default=3.6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ranges", type=int, choices=(1, 3, 6), default=3,
                        help="block ranges per layer type (each type x range is one row: 7 x ranges rows)")
    parser.add_argument("--out", default="benchmarks/results_llm_q3_plan.json")
    parser.add_argument("--recipe", default="benchmarks/llm_q3_plan.yaml", help="where the planned recipe is written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load(args.model)
    dev = text_windows(tokenizer, reference_text("dev"), args.calibration + args.windows, WINDOW)
    calibration, scored = dev[:args.calibration], torch.cat([w["input_ids"] for w in dev[args.calibration:]])
    blocks = preset("llm-q4").stages[0]  # the blocks' GPTQ stage, at 3 bits
    recipe = Recipe((Stage.of(GPTQConfig(bits=3, symmetric=True, group_size=32, search="mse", act_order=True),
                              blocks.targets),), name="llm-q3-blocks")
    fixed = model.model.embed_tokens.weight.numel() + model.model.embed_tokens.weight.shape[0] * 2  # int8 rows
    fixed += sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("norm.weight"))
    budget = int((args.file_mb - args.support_mb) * 1e6) - fixed
    start = time.perf_counter()
    rows = lm_layer_sensitivity(model, recipe, scored, calibration, upgrades=lambda c: [{"bits": 4}],
                                groups=groups(args.ranges), progress=lambda line: print(line, flush=True))
    mixed = mixed_precision_recipe(rows, recipe, budget_bytes=budget, name="llm-q3")
    upgraded = sorted(pattern for pattern, _ in mixed.stages[0].overrides)
    result = {
        "budget_linear_bytes": budget, "seconds": round(time.perf_counter() - start, 1),
        "upgraded_to_4_bits": upgraded,
        "rows": [{"name": r.name, "params": r.params, "kl_3bit": r.damage, "kl_4bit": r.upgrades[0].damage,
                  "bytes_3bit": r.base.bytes, "bytes_4bit": r.upgrades[0].bytes} for r in rows],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    # the whole recipe: the 8-bit tied embedding/output stages of llm-q4, then the planned blocks
    full = Recipe((*mixed.stages, *preset("llm-q4").stages[1:]), name="llm-q3")
    with open(args.recipe, "w") as f:
        f.write(full.to_yaml())
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
