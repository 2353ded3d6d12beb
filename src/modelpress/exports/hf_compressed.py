"""Hugging Face folders in the compressed-tensors format ("pack-quantized"): quantised weights that
transformers loads as they are (with the `compressed-tensors` package installed), on CPU too.

A symmetric 4- or 8-bit weight with a float16 scale per row or per group is written bit-exact, without
requantising:

    <module>.weight_packed  int32 (R, C * bits / 32): our packed code rows viewed as little-endian int32.
                            compressed-tensors packs each signed value v as v + 2^(bits-1), value j of a row
                            at bits [j*bits, (j+1)*bits) of the row's stream: our codes are exactly v +
                            2^(bits-1) (the midpoint), packed LSB-first the same way (encodings/packing.py)
    <module>.weight_scale   (R, G) in the folder's dtype (our float16 scales; exact in float16)
    <module>.weight_shape   int64 [R, C]

`quantization_config` has one config group per scheme, targeting its modules by exact name. Other
compressed weights (asymmetric zero points, 2/3 bits, sparse, low rank, clustered, an activation kernel)
have no such form and are refused, naming the layer and a recipe that fits.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from modelpress.encodings import QuantizedTensor
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR
from modelpress.errors import UnsupportedError
from modelpress.exports.hf_folder import compressed_modules
from modelpress.nn.kernels import ACTIVATION_KERNELS

__all__ = ["compressed_tensors_state", "quantization_config"]

PACKED_BITS = (4, 8)


def _scheme_key(enc: QuantizedTensor) -> tuple[int, int]:
    return enc.scheme.bits, enc.scheme.group_size


def _check(name: str, module: nn.Module) -> QuantizedTensor:
    """The module's encoding if compressed-tensors' pack-quantized format holds it exactly, else an error."""
    enc = module.encoding
    fits = (isinstance(enc, QuantizedTensor) and isinstance(module, nn.Module) and hasattr(module, "in_features")
            and enc.scheme.symmetric and enc.scheme.bits in PACKED_BITS and enc.scheme.group_size != PER_TENSOR
            and enc.matrix_shape[1] % 8 == 0 and getattr(module, "kernel", None) not in ACTIVATION_KERNELS)
    if not fits:
        raise UnsupportedError(
            f"layer {name!r} ({enc.describe()}, {type(module).__name__}) has no compressed-tensors form: it holds "
            "symmetric 4/8-bit Linear weights per row or per group; use the llm-q4 / llm-int8 presets (or RTN/GPTQ "
            "with symmetric: true, bits 4 or 8), or export dequantised (quantized=False)")
    return enc


def compressed_tensors_state(model: nn.Module, dtype: torch.dtype,
                             skip: set[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict]:
    """The packed tensors of every compressed Linear ({name}.weight_packed/_scale/_shape) and, by scheme,
    the module names (for `quantization_config`); modules in `skip` (an output layer tied to the embedding
    table, which transformers ties to the dense table) are left out."""
    state: dict[str, torch.Tensor] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for name, module in compressed_modules(model).items():
        if not hasattr(module, "in_features") or name in skip:
            continue  # embeddings stay dense (compressed-tensors quantises Linear layers)
        enc = _check(name, module)
        rows, cols = enc.matrix_shape
        state[f"{name}.weight_packed"] = enc.codes.contiguous().view(torch.int32)  # (R, C * bits / 32)
        state[f"{name}.weight_scale"] = enc.scale.to(dtype)  # (R, G)
        state[f"{name}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        groups.setdefault(_scheme_key(enc), []).append(name)
    return state, groups


def quantization_config(groups: dict[tuple[int, int], list[str]]) -> dict[str, Any]:
    """compressed-tensors' `quantization_config`: one group per (bits, group size), targets by exact name."""
    config_groups = {}
    for i, ((bits, group_size), names) in enumerate(sorted(groups.items())):
        strategy = "channel" if group_size == PER_CHANNEL else "group"
        weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy,
                   "group_size": None if group_size == PER_CHANNEL else group_size, "dynamic": False}
        config_groups[f"group_{i}"] = {"targets": [f"re:^{re.escape(n)}$" for n in names], "weights": weights,
                                       "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": []}
