"""Named recipes, reached one way: `preset(name)` gives the Recipe, `preset_names()` lists them
(`compress(model, "int4")` goes through `preset`). Every preset quantises the embedding tables
too: they are half of a small transformer's bytes (MiniLM: 11.9M of its 22.7M parameters)."""

from __future__ import annotations

from modelpress.errors import RecipeError
from modelpress.recipe import Recipe

__all__ = ["DEFAULT_PRESET", "preset", "preset_names"]

_LINEAR_AND_EMBEDDING = {"types": ["Linear", "Embedding"]}

_PRESETS: dict[str, dict] = {  # the recipes as plain data; read through preset()
    # Weight-only int8 per output channel (per row for embeddings): near-lossless, 4x smaller.
    "int8": {
        "name": "int8",
        "stages": [{"pass": "rtn", "targets": _LINEAR_AND_EMBEDDING, "config": {"bits": 8, "group_size": "channel"}}],
    },
    # Dynamic int8 activations x int8 weights on fbgemm for Linear layers (faster on CPU);
    # embeddings are int8 weight-only (a lookup has no matmul to speed up).
    "w8a8": {
        "name": "w8a8",
        "stages": [
            {"pass": "dynamic_int8", "targets": {"types": ["Linear"]}, "config": {"group_size": "channel"}},
            {"pass": "rtn", "targets": {"types": ["Embedding"]}, "config": {"bits": 8, "group_size": "channel"},
             "optional": True},
        ],
    },
    # W8A8 with SmoothQuant (needs calibration; without it a sentence encoder is calibrated on
    # calibration_sentences(128)). Measured on MiniLM (benchmarks/results_awq_smoothquant.md): the
    # FFN output projections carry most of w8a8's loss; their inputs (GELU outputs) have a few
    # tokens with huge activations, which per-channel smoothing from calibration maxima does not
    # fix on held-out sentences but a range per token does. `activations: auto` gives a range per
    # token only where calibration shows such tokens (MiniLM: the FFN outputs of blocks 0-3), since
    # it costs two passes over x. The value projections, attention outputs (folded into the values)
    # and FFN inputs are smoothed with alpha 0.6; smoothing q and k as well gains nothing measurable
    # and costs two more input multiplies per block.
    "w8a8-smooth": {
        "name": "w8a8-smooth",
        "stages": [
            {"pass": "dynamic_int8", "targets": {"types": ["Linear"]},
             "config": {"group_size": "channel", "activations": "auto"},
             "overrides": {pattern: {"smooth_alpha": 0.6, "activations": "tensor"} for pattern in
                           ("*.attention.self.value", "*.attention.output.dense", "*.intermediate.dense")}},
            {"pass": "rtn", "targets": {"types": ["Embedding"]}, "config": {"bits": 8, "group_size": "channel"},
             "optional": True},
        ],
    },
    # 4-bit asymmetric groups with error-minimising ranges, ~7x smaller. Linear layers carry the
    # fidelity loss (measured on MiniLM: g64 alone gives mean cosine 0.970, g32 0.978), so they use
    # groups of 32; embedding rows lose little at g64 (0.9975).
    "int4": {
        "name": "int4",
        "stages": [
            {"pass": "rtn", "targets": {"types": ["Linear"]},
             "config": {"bits": 4, "symmetric": False, "group_size": 32, "search": "mse"}},
            {"pass": "rtn", "targets": {"types": ["Embedding"]}, "optional": True,
             "config": {"bits": 4, "symmetric": False, "group_size": 64, "search": "mse"}},
        ],
    },
    # 3-bit groups of 64: smaller still, with a visible fidelity cost (see benchmarks/RESULTS.md).
    "int3": {
        "name": "int3",
        "stages": [
            {
                "pass": "rtn",
                "targets": _LINEAR_AND_EMBEDDING,
                "config": {"bits": 3, "symmetric": False, "group_size": 64, "search": "mse"},
            }
        ],
    },
}

DEFAULT_PRESET = "int8"


def preset_names() -> list[str]:
    """The preset names, the default first."""
    return list(_PRESETS)


def preset(name: str) -> Recipe:
    """The recipe of a named preset (a new Recipe each call: change it freely)."""
    if name not in _PRESETS:
        raise RecipeError(f"unknown preset {name!r}: use one of {sorted(preset_names())} or a recipe YAML file")
    return Recipe.from_dict(_PRESETS[name])
