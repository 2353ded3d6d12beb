"""Modules that execute encodings, the kernels they choose between, and the records model surgery keeps."""

from modelpress.nn.conv import CompressedConv2d
from modelpress.nn.kernels import Kernel, select_kernel, supports
from modelpress.nn.modules import CompressedEmbedding, CompressedLinear, EmbeddingKernel
from modelpress.nn.provenance import Provenance, provenance, record_provenance
from modelpress.nn.registry import TrainingModule, compressed_twin, install, is_compressed

__all__ = [
    # the modules and their kernels
    "CompressedConv2d",
    "CompressedEmbedding",
    "CompressedLinear",
    "EmbeddingKernel",
    "Kernel",
    "select_kernel",
    "supports",
    # model surgery (the registry: nn/registry.py) and the record a compressed model keeps
    "TrainingModule", "compressed_twin", "install", "is_compressed",
    "Provenance", "provenance", "record_provenance",
]
