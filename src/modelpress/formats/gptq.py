"""GPTQ-format Hugging Face folders in (AutoGPTQ, GPTQModel, transformers+optimum), a CausalLM out whose
quantised Linears keep the file's codes, scales and zero points (formats/gptq_tensors.py): no detour
through float.

A folder is GPTQ when config.json's `quantization_config` has quant_method "gptq", or (older AutoGPTQ
folders) a quantize_config.json lies beside it. Read from it: bits (2, 3, 4, 8), group_size (-1 or
positive), sym, desc_act, and the checkpoint format (`checkpoint_format` or GPTQModel's `format`):
"gptq" (v1: zero points stored minus one) or "gptq_v2". Refused with a one-line error: other packings
(marlin, bitblas, ...), pack_dtype other than int32, per-module overrides (GPTQModel's `dynamic`), a
quantised layer whose weight is tied to another. Only model.safetensors (or AutoGPTQ's
`<model_file_base_name>.safetensors`) is read, never a pickle, through the bounded safetensors parser;
every GPTQ tensor's shape and dtype is checked against the layer config.json declares before anything
is built. Sharded checkpoints (model.safetensors.index.json) are not read yet.

A layer whose grouping no modelpress encoding holds (a g_idx that is neither i // group_size nor a
permutation of it, or a group size that does not divide the inputs) is loaded as its exact float weight,
with one warning naming the layers and why. config.json is kept without its quantization_config (the
model is modelpress's now, and a later export records its own) and with dtype float32: the float weights
(float16 in GPTQ folders) are widened, as every model modelpress loads runs in float32.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress import fileio
from modelpress.errors import FormatError, UnsupportedError
from modelpress.formats import tensorfile
from modelpress.formats.causal_lm import CAUSAL_LM_FILES, CausalLM, causal_lm_from_files, fill_causal_lm
from modelpress.formats.gptq_tensors import GPTQ_BITS, gptq_encoding
from modelpress.formats.hf import MAX_WEIGHTS_BYTES, parse_json, read_support_files, weights_file
from modelpress.limits import check_allocation
from modelpress.nn.registry import install
from modelpress.nn.tying import tied_parameters

__all__ = ["GPTQ_CONFIG", "GPTQFormat", "gptq_format", "load_gptq"]

GPTQ_CONFIG = "quantize_config.json"  # AutoGPTQ's and GPTQModel's own copy of the settings
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_FORMATS = {"gptq": True, "gptq_v2": False}  # checkpoint format -> zero points stored minus one (v1)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # a weights file name beside config.json, never a path


@dataclass(frozen=True)
class GPTQFormat:
    """The settings of a GPTQ checkpoint that decide how its tensors are read."""

    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    desc_act: bool
    v1: bool
    weights: str = "model.safetensors"  # AutoGPTQ names it after model_file_base_name


def _bad(where: str, what: str) -> FormatError:
    return FormatError(f"{where}: {what}; use the GPTQ checkpoint's own files, unmodified")


def _settings(folder: Path) -> tuple[dict[str, Any], str] | None:
    """The GPTQ settings of a folder and the file they came from, or None when it is not a GPTQ folder."""
    files = read_support_files(folder, ("config.json", GPTQ_CONFIG))
    if "config.json" in files:
        fields = parse_json(files, "config.json")
        qc = fields.get("quantization_config") if isinstance(fields, dict) else None
        if qc is not None:
            if not isinstance(qc, dict):
                raise _bad("config.json", "quantization_config is not a JSON object")
            return (qc, "config.json") if qc.get("quant_method") == "gptq" else None
    if GPTQ_CONFIG not in files:
        return None
    qc = parse_json(files, GPTQ_CONFIG)
    if not isinstance(qc, dict):
        raise _bad(GPTQ_CONFIG, "it is not a JSON object")
    return (qc, GPTQ_CONFIG) if qc.get("quant_method", "gptq") == "gptq" else None


def gptq_format(folder: Path) -> GPTQFormat | None:
    """The GPTQ settings of a Hugging Face folder, or None when it holds no GPTQ checkpoint."""
    found = _settings(folder)
    if found is None:
        return None
    qc, where = found

    def field(key: str, kind: type, default: Any) -> Any:
        value = qc.get(key, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _bad(where, f"{key} is {value!r}, not a {kind.__name__}")
        return value

    bits, group_size = field("bits", int, None), field("group_size", int, -1)
    if bits not in GPTQ_BITS:
        raise _bad(where, f"bits {bits} is not a GPTQ width modelpress reads ({', '.join(map(str, GPTQ_BITS))})")
    if group_size != -1 and group_size < 1:
        raise _bad(where, f"group_size {group_size} is neither -1 nor positive")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in _FORMATS or qc.get("is_marlin_format"):
        raise UnsupportedError(f"{where}: GPTQ checkpoint format {fmt!r} is not read (only 'gptq' and 'gptq_v2'); "
                               "save the model in the gptq format with GPTQModel first")
    if qc.get("pack_dtype", "int32") != "int32":
        raise UnsupportedError(f"{where}: pack_dtype {qc.get('pack_dtype')!r} is not read (only int32); "
                               "save the model with pack_dtype int32")
    if qc.get("dynamic"):
        raise UnsupportedError(f"{where}: per-module GPTQ settings (dynamic) are not read; quantise with one "
                               "setting for every layer")
    base = qc.get("model_file_base_name")
    weights = f"{base}.safetensors" if isinstance(base, str) and _NAME.fullmatch(base) else "model.safetensors"
    if not (folder / weights).exists():
        weights = "model.safetensors"
    return GPTQFormat(bits=bits, group_size=group_size, sym=field("sym", bool, True),
                      desc_act=field("desc_act", bool, False), v1=_FORMATS[fmt], weights=weights)


def _split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the float tensors, {layer name: its GPTQ parts})."""
    plain: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, part = key.rpartition(".")
        if part in _PARTS and layer:
            layers.setdefault(layer, {})[part] = value
        else:
            plain[key] = value
    return plain, layers


def load_gptq(folder: Path, fmt: GPTQFormat | None = None) -> CausalLM:
    """The causal LM of a GPTQ-format folder: its GPTQ layers as modelpress encodings, the rest in float32."""
    fmt = fmt or gptq_format(folder)
    if fmt is None:
        raise FormatError(f"{folder}: no GPTQ quantization_config in config.json and no {GPTQ_CONFIG}; "
                          "load it as a plain Hugging Face folder")
    weight_file = folder / fmt.weights if fmt.weights != "model.safetensors" else weights_file(folder)
    files = read_support_files(folder, CAUSAL_LM_FILES)
    config = parse_json(files, "config.json") if "config.json" in files else None
    if isinstance(config, dict):  # float32 like every model modelpress loads (GPTQ folders say float16)
        config = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
        files["config.json"] = json.dumps({**config, "dtype": "float32"}, indent=2).encode()
    lm = causal_lm_from_files(files, source=folder)
    buffer = fileio.read_buffer(os.path.realpath(weight_file), MAX_WEIGHTS_BYTES, "weights file")
    state, layers = _split(tensorfile.parse(buffer, str(weight_file)))
    modules = dict(lm.model.named_modules())
    prefix = getattr(lm.model, "base_model_prefix", "") + "."
    if layers and not any(name in modules for name in layers) and all(n.startswith(prefix) for n in layers):
        layers = {n[len(prefix):]: parts for n, parts in layers.items()}
    tied = {n.rpartition(".")[0] for pair in tied_parameters(lm.model).items() for n in pair}
    encodings, floats, wrapped = {}, {}, 0
    for name, parts in sorted(layers.items()):
        module, where = modules.get(name), f"{weight_file}: layer {name!r}"
        if not isinstance(module, nn.Linear):
            raise _bad(str(weight_file), f"{name!r} holds GPTQ tensors but config.json has no Linear layer there")
        if name in tied:
            raise UnsupportedError(f"{where} is quantised but its weight is tied to another layer; untie them "
                                   "(tie_word_embeddings false) or keep that layer in float")
        check_allocation(4 * module.in_features * module.out_features, f"{where} (in case it must be dequantised)")
        if fmt.desc_act and "g_idx" not in parts:
            raise _bad(where, "desc_act is set but the layer has no g_idx")
        layer = gptq_encoding(parts, (module.out_features, module.in_features), fmt.bits, fmt.group_size, fmt.v1,
                              where)
        wrapped += layer.wrapped_zeros
        if layer.why_float is None:
            encodings[name] = layer.weight
        else:
            state[f"{name}.weight"], floats[name] = layer.weight, layer.why_float
    for name, enc in encodings.items():  # on the meta skeleton: the float state below fills the rest
        install(lm.model, name, enc)
    fill_causal_lm(lm, state, weight_file)
    if floats:
        names = sorted(floats)
        warnings.warn(f"{folder}: {len(names)} GPTQ layer(s) loaded as exact float weights, not codes: "
                      f"{names[0]!r} ({floats[names[0]]})" + (f" and {len(names) - 1} more" if len(names) > 1 else ""),
                      UserWarning, stacklevel=2)
    if wrapped:
        warnings.warn(f"{folder}: {wrapped} v1 zero point(s) are stored as all ones, read as 0 as GPTQModel reads "
                      f"them (AutoGPTQ's v1 kernels read {1 << fmt.bits}); re-save as gptq_v2 to settle it",
                      UserWarning, stacklevel=2)
    return lm
