"""Compression passes, registered by name (what recipes write) and by config type (what Python hands over)."""

from modelpress.encodings import RangeSearch
from modelpress.passes.base import PASSES, PassContext, PassSpec, Target, pass_for, pass_for_config, register_pass
from modelpress.passes.config import PassConfig, WeightQuant, config_from_dict, config_to_dict
from modelpress.passes.quantize import DynamicInt8Config, RTNConfig
from modelpress.passes.gptq import GPTQConfig
from modelpress.passes.awq import AWQConfig
from modelpress.passes.qat import QATConfig, convert_qat, prepare_qat
from modelpress.passes.prune import GradualConfig, GradualPruner, MagnitudeConfig, SparseGPTConfig, WandaConfig
from modelpress.passes.structured import PruneChannelsConfig, PruneFFNConfig, PruneHeadsConfig, StructuredConfig
from modelpress.passes.cluster import KMeansConfig, finetune_centroids
from modelpress.passes.simplify import SimplifyConfig  # simplify() itself: modelpress.passes.simplify.simplify
from modelpress.passes.lowrank import LowRankConfig

__all__ = [
    "PASSES",
    "PassConfig",
    "PassContext",
    "PassSpec",
    "Target",
    "WeightQuant",
    "config_from_dict",
    "config_to_dict",
    "pass_for",
    "pass_for_config",
    "register_pass",
    "AWQConfig",
    "DynamicInt8Config",
    "GPTQConfig",
    "GradualConfig",
    "GradualPruner",
    "KMeansConfig",
    "LowRankConfig",
    "MagnitudeConfig",
    "PruneChannelsConfig",
    "PruneFFNConfig",
    "PruneHeadsConfig",
    "QATConfig",
    "RangeSearch",
    "RTNConfig",
    "SimplifyConfig",
    "SparseGPTConfig",
    "StructuredConfig",
    "WandaConfig",
    "convert_qat",
    "finetune_centroids",
    "prepare_qat",
]
