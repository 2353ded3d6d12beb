"""Compression passes, registered by name so that recipes can use them."""

from modelpress.passes.base import PASSES, PassContext, Target, pass_for, register_pass
from modelpress.passes.quantize import DynamicInt8Config, RangeSearch, RTNConfig
from modelpress.passes.gptq import GPTQConfig
from modelpress.passes.awq import AWQConfig
from modelpress.passes.qat import QATConfig, convert_qat, prepare_qat
from modelpress.passes.prune import GradualConfig, GradualPruner, MagnitudeConfig, SparseGPTConfig, WandaConfig
from modelpress.passes.structured import StructuredConfig
from modelpress.passes.cluster import KMeansConfig, finetune_centroids
from modelpress.passes.simplify import SimplifyConfig  # simplify() itself: modelpress.passes.simplify.simplify
from modelpress.passes.lowrank import LowRankConfig

__all__ = [
    "PASSES",
    "PassContext",
    "Target",
    "pass_for",
    "register_pass",
    "DynamicInt8Config",
    "RangeSearch",
    "RTNConfig",
    "GPTQConfig",
    "AWQConfig",
    "QATConfig",
    "convert_qat",
    "prepare_qat",
    "GradualConfig",
    "GradualPruner",
    "MagnitudeConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "StructuredConfig",
    "KMeansConfig",
    "finetune_centroids",
    "SimplifyConfig",
    "LowRankConfig",
]
