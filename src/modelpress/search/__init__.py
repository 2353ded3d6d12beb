"""Searching over recipes with measurements: per-layer sensitivity, and mixed precision from it.

The files: sensitivity.py (each layer compressed alone, scored against the float model),
lm_sensitivity.py (the same for causal LMs, scored by the KL of their next-token distributions),
replay.py (fast re-encoding that replays the blocks a change cannot reach), overrides.py (recipes
with per-layer config changes), mixed_precision.py (a size budget spent greedily as overrides); the joint
search over bits, sparsity and rank: space.py (options), table.py (measured per layer), allocate.py (exact
knapsack), validate.py (end-to-end validation and executors), runfolder.py (resumable runs), joint.py.
"""

from modelpress.search.lm_sensitivity import lm_layer_sensitivity, next_token_kl
from modelpress.search.mixed_precision import (MixedPrecisionPlan, default_upgrades, mixed_precision_recipe,
                                               plan_mixed_precision)
from modelpress.search.sensitivity import MIN_SENTENCES, LayerSensitivity, Measurement, layer_sensitivity

__all__ = [
    "MIN_SENTENCES",
    "LayerSensitivity",
    "Measurement",
    "MixedPrecisionPlan",
    "default_upgrades",
    "layer_sensitivity",
    "lm_layer_sensitivity",
    "mixed_precision_recipe",
    "next_token_kl",
    "plan_mixed_precision",
]
