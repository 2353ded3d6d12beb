"""Encodings: how one tensor is represented (pure tensor maths; no modules, no I/O)."""

from modelpress.encodings.base import ENCODINGS, Encoding, encoding_from_parts, register_encoding
from modelpress.encodings.clustered import ClusteredTensor, KMeansInit, cluster
from modelpress.encodings.dense import DenseTensor
from modelpress.encodings.lowrank import LowRankTensor
from modelpress.encodings.packing import SUPPORTED_BITS, pack_codes, packed_row_bytes, unpack_codes
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR, QuantizedTensor, QuantScheme, quantize
from modelpress.encodings.range_search import mse_params
from modelpress.encodings.sparse import SparseLayout, SparseTensor, sparsify

__all__ = [
    "ENCODINGS",
    "Encoding",
    "ClusteredTensor",
    "KMeansInit",
    "DenseTensor",
    "LowRankTensor",
    "QuantizedTensor",
    "QuantScheme",
    "SparseLayout",
    "SparseTensor",
    "PER_CHANNEL",
    "PER_TENSOR",
    "SUPPORTED_BITS",
    "cluster",
    "encoding_from_parts",
    "mse_params",
    "pack_codes",
    "packed_row_bytes",
    "quantize",
    "register_encoding",
    "sparsify",
    "unpack_codes",
]
