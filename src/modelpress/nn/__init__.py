"""Modules that execute encodings, the kernels they choose between, and the records model surgery keeps."""

from modelpress.nn.conv import CompressedConv2d
from modelpress.nn.kernels import Kernel, select_kernel, supports
from modelpress.nn.modules import CompressedEmbedding, CompressedLinear, EmbeddingKernel
from modelpress.nn.provenance import Provenance, provenance, record_provenance
from modelpress.nn.registry import (COMPRESSED_TYPES, TrainingModule, check_saveable, compressed_twin, install,
                                    is_compressed, kind_of, module_entry, module_from_entry)

__all__ = [
    "COMPRESSED_TYPES",
    "CompressedConv2d",
    "CompressedEmbedding",
    "CompressedLinear",
    "EmbeddingKernel",
    "Kernel",
    "Provenance",
    "TrainingModule",
    "check_saveable",
    "compressed_twin",
    "install",
    "is_compressed",
    "kind_of",
    "module_entry",
    "module_from_entry",
    "provenance",
    "record_provenance",
    "select_kernel",
    "supports",
]
