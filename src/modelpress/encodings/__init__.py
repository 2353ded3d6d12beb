"""Encodings: how one tensor is represented (pure tensor maths; no modules, no I/O)."""

from modelpress.encodings.base import ENCODINGS, Encoding, encoding_from_parts, register_encoding
from modelpress.encodings.clustered import ClusteredTensor, KMeansInit, cluster
from modelpress.encodings.dense import DenseTensor
from modelpress.encodings.lowrank import LowRankTensor
from modelpress.encodings.permuted import InputPermutedTensor
from modelpress.encodings.packing import SUPPORTED_BITS, pack_codes, packed_row_bytes, unpack_codes
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR, QuantizedTensor, QuantScheme, grouped, quantize
from modelpress.encodings.range_search import RangeSearch, fit_ranges, mse_params, quantize_weight
from modelpress.encodings.sparse import SparseLayout, SparseTensor, sparsify
from modelpress.encodings.views import as_matrix, matrix_dims

__all__ = [
    "ENCODINGS",
    "Encoding",
    "ClusteredTensor",
    "KMeansInit",
    "DenseTensor",
    "InputPermutedTensor",
    "LowRankTensor",
    "QuantizedTensor",
    "QuantScheme",
    "RangeSearch",
    "SparseLayout",
    "SparseTensor",
    "PER_CHANNEL",
    "PER_TENSOR",
    "SUPPORTED_BITS",
    "as_matrix",
    "cluster",
    "encoding_from_parts",
    "fit_ranges",
    "grouped",
    "matrix_dims",
    "mse_params",
    "pack_codes",
    "packed_row_bytes",
    "quantize",
    "quantize_weight",
    "register_encoding",
    "sparsify",
    "unpack_codes",
]
