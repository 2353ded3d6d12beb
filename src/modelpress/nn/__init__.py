"""Modules that execute encodings, and the kernels they choose between."""

from modelpress.nn.conv import CompressedConv2d
from modelpress.nn.kernels import Kernel, select_kernel, supports
from modelpress.nn.modules import CompressedEmbedding, CompressedLinear, EmbeddingKernel

__all__ = [
    "CompressedConv2d",
    "CompressedEmbedding",
    "CompressedLinear",
    "EmbeddingKernel",
    "Kernel",
    "select_kernel",
    "supports",
]
