"""Calibration capture: the one mechanism that feeds data-aware passes (GPTQ, AWQ, SmoothQuant, Wanda,
SparseGPT, activation-aware low rank, structured pruning's activation importance) with statistics
of their layers' inputs.

Calibration data is normalised into batches (`prepare_batches`): sentences are tokenised with
`model.tokenize`, dicts of tensors are keyword inputs, tensors (or tuples of tensors) positional
ones. The `attention_mask` of a batch, when it has one, marks the real tokens: padded positions
never enter a statistic. A causal LM is calibrated on running text through its own tokenizer
(`calibration_windows(tokenizer)`: windows of the `dev` reference text, as dicts of input ids), and
its key/value cache is off for the walk (a re-run block must not attend to its earlier runs).

`run_blockwise` walks the model's sequence of repeated blocks (e.g. `encoder.layer`):

    1. catch block 0's inputs (args and kwargs) for every batch with a pre-hook that stops the
       forward there (the "catcher");
    2. for block i: run it on every batch with hooks on its target layers, which accumulate each
       layer's `LayerStats`; hand the layers to the pass (which may replace them, e.g. quantise);
       layers are visited in execution order, in groups that share one input (q/k/v), and each
       group is measured after the groups before it were processed ("true sequential");
    3. re-run the processed block on every batch: its outputs are block i+1's inputs.

So memory is bounded by one block's activations for the calibration set, plus the statistics
of one group of layers; never all layers' activations. Target layers outside the blocks (a
pooler, or every layer of a model without repeated blocks) are measured afterwards by plain
whole-model forwards with hooks. A model whose blocks do not form a chain (block i+1 does not
consume block i's output) is measured layer by layer with whole-model forwards instead.

The files, in reading order: inputs.py (calibration data as batches), stats.py (LayerStats),
blocks.py (finding and running the blocks), hooks.py (measuring layers), walk.py (run_blockwise).
"""

from modelpress.calibration.blocks import find_blocks
from modelpress.calibration.inputs import (CalibrationBatch, calibration_sentences, calibration_windows,
                                          prepare_batches, text_windows)
from modelpress.calibration.stats import LayerStats, real_tokens
from modelpress.calibration.walk import ProcessFn, release_free_memory, run_blockwise

__all__ = [
    "CalibrationBatch",
    "LayerStats",
    "ProcessFn",
    "calibration_sentences",
    "calibration_windows",
    "find_blocks",
    "prepare_batches",
    "real_tokens",
    "release_free_memory",
    "run_blockwise",
    "text_windows",
]
