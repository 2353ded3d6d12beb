"""Writes recipes_main.json: what the recipe parser of main (before issue 13) made of every preset, every
example YAML and one flat config per pass, so that tests/test_recipe_golden.py can hold later parsers to it.

    HF_HUB_OFFLINE=1 python tests/golden/make_recipes_golden.py   # run on the reference checkout only
"""

import json
from pathlib import Path

from modelpress.passes.base import config_to_dict
from modelpress.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OVERRIDDEN = "encoder.layer.0.attention.self.query"  # a name the override cases resolve their config for

# One stage per case: the pass, its flat YAML config, and (optionally) overrides.
CASES = [
    ("rtn", {}), ("rtn", {"bits": 4, "symmetric": False, "group_size": 32, "search": "mse", "kernel": "dense"}),
    ("rtn", {"bits": 8, "group_size": "tensor"}), ("rtn", {"bits": 2, "symmetric": False, "group_size": 0}),
    ("dynamic_int8", {}),
    ("dynamic_int8", {"group_size": "tensor", "weight_bits": 8, "search": "minmax", "smooth_alpha": 0.5,
                      "fold": "explicit", "activations": "auto"}),
    ("gptq", {}),
    ("gptq", {"bits": 3, "symmetric": True, "group_size": "channel", "damp": 0.05, "block_size": 64,
              "act_order": True, "search": "minmax", "kernel": "dense"}),
    ("awq", {}), ("awq", {"bits": 8, "symmetric": True, "group_size": 32, "grid": 10, "search": "minmax",
                          "fold": "explicit", "kernel": "int8_mm"}),
    ("qat", {}), ("qat", {"bits": 2, "symmetric": False, "group_size": 16, "init": "minmax", "kernel": "dense"}),
    ("magnitude", {"sparsity": 0.5}),
    ("magnitude", {"pattern": "2:4", "bits": 4, "group_size": "channel", "search": "minmax", "layout": "bitmask",
                   "scope": "layer", "kernel": "sparse_csr"}),
    ("magnitude", {"sparsity": 0.25, "scope": "row", "bits": 8, "symmetric": True, "group_size": 16}),
    ("magnitude", {"sparsity": 0.9, "scope": "global", "group_size": 64}),
    ("wanda", {"sparsity": 0.3}), ("wanda", {"pattern": "4:8", "bits": 3}),
    ("sparsegpt", {"pattern": "2:4", "bits": 4, "damp": 0.02, "block_size": 64}),
    ("sparsegpt", {"sparsity": 0.5, "symmetric": True, "bits": 8, "search": "minmax"}),
    ("prune_ffn", {}), ("prune_heads", {"ratio": 0.5, "importance": "activation", "reconstruct": True}),
    ("prune_channels", {"ratio": 0.25, "importance": "l1", "multiple_of": 8}),
    ("kmeans", {}), ("kmeans", {"bits": 5, "init": "random", "iterations": 10, "seed": 3}),
    ("simplify", {}),
    ("lowrank", {"rank": 8}),
    ("lowrank", {"energy": 0.9, "bits": 4, "group_size": 32, "search": "minmax", "activation_aware": True,
                 "damp": 0.05, "skip_if_larger": False, "kernel": "low_rank"}),
    ("lowrank", {"budget": 0.5, "group_size": "channel"}),
]
OVERRIDES = [
    ("rtn", {"bits": 4, "group_size": 32}, {"*.query": {"bits": 8, "group_size": "channel"}, "*.key": {"bits": 3}}),
    ("gptq", {}, {"encoder.*": {"act_order": True, "search": "minmax"}}),
    ("qat", {"init": "minmax"}, {"*.query": {"init": "mse", "bits": 8, "symmetric": True}}),
    ("magnitude", {"sparsity": 0.5}, {"*.query": {"sparsity": 0.75, "bits": 4, "scope": "row"}}),
    ("lowrank", {"rank": 4}, {"*.query": {"rank": 2, "bits": 8}}),
    ("dynamic_int8", {}, {"*.query": {"smooth_alpha": 0.6, "activations": "tensor"}}),
]


def stage_case(pass_name, config, overrides=None):
    stage = {"pass": pass_name, "config": config}
    if overrides:
        stage["overrides"] = overrides
    recipe = Recipe.from_dict({"name": f"{pass_name}-case", "stages": [stage]})
    out = {"input": {"name": f"{pass_name}-case", "stages": [stage]}, "to_dict": recipe.to_dict()}
    if overrides:
        out["config_for"] = {OVERRIDDEN: config_to_dict(recipe.stages[0].config_for(OVERRIDDEN))}
    return out


def main() -> None:
    from modelpress.presets import PRESETS, preset

    golden = {
        "presets": {name: preset(name).to_dict() for name in PRESETS},
        "examples": {p.name: Recipe.from_file(p).to_dict() for p in sorted((ROOT / "examples").glob("*.y*ml"))},
        "stages": [stage_case(p, c) for p, c in CASES] + [stage_case(p, c, o) for p, c, o in OVERRIDES],
    }
    (HERE / "recipes_main.json").write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
