"""Unstructured and N:M pruning: magnitude, Wanda, SparseGPT, and gradual pruning during training.

Every pass removes a fraction of each selected layer's weights and stores the rest as a
`SparseTensor` (kept values + positions), so the pruned model is smaller on disk and in the
checkpoint, not just full of zeros. A layer's weight is viewed as the matrix (R, C): rows are
output channels, columns are inputs (flattened in*kh*kw for convolutions).

- `magnitude`: keep the largest |W|, per layer, per output row, or across all selected layers.
- `wanda` (Sun et al., 2023): keep the largest |W_ij| * ||X_j||_2 in each output row, X being the
  layer's calibration inputs (no weight update).
- `sparsegpt` (Frantar & Alistarh, 2023): choose the mask and update the kept weights to
  minimise the output error ||X W^T - X W_s^T||^2, column by column with the inverse-Hessian
  machinery of GPTQ; optionally quantise the kept weights in the same pass (prune + quantise).

The pattern is one parameter: "unstructured" (a `sparsity` fraction) or "N:M" (keep N of every M
consecutive inputs of a row, e.g. 2:4). With `bits`, kept values are quantised (per row or in
groups of kept values), which needs every row to keep the same count: N:M patterns, per-row
magnitude, Wanda and SparseGPT all do.

`GradualPruner` raises sparsity during fine-tuning on the cubic schedule of Zhu & Gupta (2017)
with magnitude, first-order Taylor (|w * dL/dw|) or movement (-w * dL/dw) importance.

The files, in reading order: config.py (what each pass takes), masks.py (scores to masks),
sparsegpt.py (the solver), passes.py (the registered passes), gradual.py (pruning while training).
"""

from modelpress.passes.prune.config import (MagnitudeConfig, Scope, SparseGPTConfig, SparsityConfig, WandaConfig,
                                            parse_pattern)
from modelpress.passes.prune.gradual import GradualConfig, GradualPruner, Importance, cubic_sparsity
from modelpress.passes.prune.masks import global_masks, keep_largest, nm_mask, pruned_count, topk_mask, wanda_scores
from modelpress.passes.prune.passes import layer_mask  # also registers magnitude, wanda and sparsegpt
from modelpress.passes.prune.sparsegpt import SparseGPTResult, check_kept_groups, kept_per_row, sparsegpt_prune

__all__ = [
    "GradualConfig",
    "GradualPruner",
    "Importance",
    "MagnitudeConfig",
    "Scope",
    "SparseGPTConfig",
    "SparseGPTResult",
    "SparsityConfig",
    "WandaConfig",
    "check_kept_groups",
    "cubic_sparsity",
    "global_masks",
    "keep_largest",
    "kept_per_row",
    "layer_mask",
    "nm_mask",
    "parse_pattern",
    "pruned_count",
    "sparsegpt_prune",
    "topk_mask",
    "wanda_scores",
]
