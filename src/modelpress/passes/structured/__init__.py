"""Structured pruning that changes shapes: FFN neurons, attention heads and convolution channels.

A removed unit takes every weight that produces it and every weight that reads it, so the model
runs with really smaller matrices, without masks:

- `prune_ffn` on a BERT-style layer (``intermediate.dense`` then ``output.dense``): neuron i is
  row i of the first Linear (and its bias) and column i of the second.
- `prune_heads` on a BERT-style attention (``self.query/key/value`` then ``output.dense``): head h
  is rows [h*d, (h+1)*d) of query, key and value and those columns of the output Linear; the
  attention's ``num_attention_heads`` and ``all_head_size`` follow.
- `prune_ffn` on a SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``: Llama, Mistral, Qwen2):
  neuron i is row i of gate and up and column i of down; ``intermediate_size`` follows.
- `prune_heads` on a grouped-query attention (``q/k/v/o_proj``): whole key/value groups with their
  query heads (``gqa: groups``), or the same number of query heads from every group (``gqa:
  queries``); the model's config follows so that a model rebuilt from it loads the pruned weights.
- `prune_channels` on a Conv2d of a plain CNN: output channel c of the conv (and of a BatchNorm2d
  after it), and the input channel c of the next conv, or the block of columns c*S..(c+1)*S of a
  Linear after a flatten (S = spatial size). Which layers read a conv's output is found by
  tracing the model with torch.fx; anything but channel-wise layers (BatchNorm, activations,
  pooling, dropout) between a conv and its readers is refused.

Importance of a unit is the product of the norms of what produces it and what reads it
(``l1`` or ``l2``; a unit nothing reads, or nothing feeds, scores 0), or, with calibration data,
its mean absolute activation times the norm of what reads it (``activation``). Units are ranked
per layer; `ratio` of them are removed (at least one is kept).

With `reconstruct` (FFN neurons and heads, calibration data needed), the Linear that reads the
units is refitted to the kept ones by least squares on its calibration inputs, so it recovers what
the removed units contributed wherever the kept ones correlate with them (on MiniLM, 30% of FFN
neurons removed: mean cosine 0.86 -> 0.95; benchmarks/results_prune.md).

The files: config.py (what the passes take, ranking and choosing units), bert.py (FFN neurons and
heads), decoder.py (SwiGLU neurons, grouped-query heads, the config they share), channels.py (conv channels), passes.py (the registered passes). Slicing layers and the
widths a checkpoint records for a load to rebuild them live in `nn/shapes.py`.
"""

from modelpress.nn.shapes import apply_shapes, record_shapes, slice_batchnorm, slice_conv, slice_linear
from modelpress.passes.structured.bert import (AttentionBlock, FFNBlock, attention_layers, ffn_importance, ffn_layers,
                                               head_importance, least_squares_reader, remove_ffn_neurons, remove_heads)
from modelpress.passes.structured.channels import ChannelPlan, channel_plan, conv_importance, remove_conv_channels
from modelpress.passes.structured.config import (GQAMode, PruneChannelsConfig, PruneFFNConfig, PruneHeadsConfig,
                                                 StructuredConfig, UnitImportance, keep_units)
from modelpress.passes.structured.decoder import (GatedFFNBlock, GroupedAttentionBlock, gated_ffn_importance,
                                                  gqa_head_importance, remove_gated_neurons, remove_gqa_heads,
                                                  sync_config)
import modelpress.passes.structured.passes  # noqa: F401  (registers prune_ffn, prune_heads, prune_channels)

__all__ = [
    "AttentionBlock",
    "ChannelPlan",
    "FFNBlock",
    "GQAMode",
    "GatedFFNBlock",
    "GroupedAttentionBlock",
    "PruneChannelsConfig",
    "PruneFFNConfig",
    "PruneHeadsConfig",
    "StructuredConfig",
    "UnitImportance",
    "apply_shapes",
    "attention_layers",
    "channel_plan",
    "conv_importance",
    "ffn_importance",
    "ffn_layers",
    "gated_ffn_importance",
    "gqa_head_importance",
    "head_importance",
    "keep_units",
    "least_squares_reader",
    "record_shapes",
    "remove_conv_channels",
    "remove_ffn_neurons",
    "remove_gated_neurons",
    "remove_gqa_heads",
    "remove_heads",
    "slice_batchnorm",
    "slice_conv",
    "slice_linear",
    "sync_config",
]
