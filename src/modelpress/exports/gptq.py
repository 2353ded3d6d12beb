"""GPTQ-format Hugging Face folders from modelpress causal LMs: the layout AutoGPTQ, GPTQModel and
transformers+optimum read (formats/gptq_tensors.py describes it), codes and scales moved, not requantised.

    model.safetensors   per quantised Linear: qweight, qzeros, scales (float16), g_idx and its bias; every
                        other weight (embeddings, norms, the output layer) dequantised to float16/bfloat16
    config.json         the model's own with `quantization_config` (quant_method gptq, bits, group_size,
                        desc_act, sym, checkpoint_format) and the `modelpress` record of what each tensor was
    quantize_config.json the same settings, for readers that look there (AutoGPTQ, GPTQModel)

A GPTQ runtime quantises every Linear of the decoder blocks with one bit width and group size, so the
export takes a model whose block Linears all hold one such grid: QuantizedTensor weights of 2, 3, 4 or 8
bits, per row, per group or per tensor, symmetric or asymmetric with integer zero points in [0, 2^bits) (what
the GPTQ and RTN passes make, llm-q4 among the presets), or an act-order weight (InputPermutedTensor, written
back in the model's column order with its g_idx). Anything else is refused with one line naming the layer.
The output layer and embeddings are written in float (GPTQ's lm_head: false).
`checkpoint_format`: "gptq" (v1, zero points stored minus one, what most readers expect; a zero point of 0
is then stored as all ones, which old AutoGPTQ kernels read as 2^bits) or "gptq_v2" (stored as they are).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress._version import __version__
from modelpress.encodings import InputPermutedTensor, QuantizedTensor
from modelpress.encodings.packing import pack_codes, unpack_codes
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR
from modelpress.errors import ConfigError, UnsupportedError
from modelpress.exports.hf_folder import compressed_modules, dense_state, encoding_records, source_folders, write_folder
from modelpress.formats import tensorfile
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.gptq import GPTQ_CONFIG
from modelpress.formats.gptq_tensors import GPTQ_BITS
from modelpress.formats.hf import parse_json
from modelpress.formats.models import load_model
from modelpress.nn.tying import tied_parameters

__all__ = ["export_gptq", "gptq_files", "gptq_layer"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_CHECKPOINT_FORMATS = {"gptq": True, "gptq_v2": False}  # -> zero points stored minus one (v1)


def _words(packed: torch.Tensor) -> torch.Tensor:
    """(R, 4W) uint8 -> (R, W) int32, each word from 4 bytes least significant first (packed_bytes' inverse)."""
    words = packed.contiguous().reshape(-1).view(torch.int32).reshape(packed.shape[0], -1)
    return words if sys.byteorder == "little" else torch.from_numpy(words.numpy().byteswap())


def gptq_layer(enc, v1: bool = True) -> tuple[dict[str, torch.Tensor], tuple[int, int, bool]] | str:
    """A Linear weight's GPTQ tensors and its (bits, group_size, symmetric), or why GPTQ cannot hold it."""
    order = None
    if isinstance(enc, InputPermutedTensor):
        enc, order = enc.inner, enc.order
    if not isinstance(enc, QuantizedTensor) or len(enc.shape) != 2:
        return f"a {enc.describe()} weight is not a quantised grid"
    scheme, (out_f, in_f) = enc.scheme, enc.shape
    if scheme.bits not in GPTQ_BITS:
        return f"{scheme.bits}-bit codes are not a GPTQ width"
    if (in_f * scheme.bits) % 32 or (out_f * scheme.bits) % 32:
        return f"a {out_f}x{in_f} weight does not fill 32-bit words at {scheme.bits} bits"
    scale, zero = enc.scale, enc.zero_points()
    if scheme.group_size == PER_TENSOR:  # one scale for the tensor: the same scale on every row
        scale, zero = scale.expand(out_f, 1), zero.expand(out_f, 1)
    top = 1 << scheme.bits
    if not (torch.equal(zero, zero.round()) and bool((zero >= 0).all()) and bool((zero < top).all())):
        return "its zero points are not integers in [0, 2^bits)"
    gs = in_f if scheme.group_size in (PER_CHANNEL, PER_TENSOR) else scheme.group_size
    codes, g_idx = enc.codes, torch.arange(in_f, dtype=torch.int32) // gs
    if order is not None:  # back to the model's column order, the groups named by g_idx
        plain = torch.empty(out_f, in_f, dtype=torch.uint8)
        plain[:, order] = unpack_codes(codes, scheme.bits, in_f)
        codes, g_idx = pack_codes(plain, scheme.bits), torch.empty_like(g_idx)
        g_idx[order] = torch.arange(in_f, dtype=torch.int32) // gs
    stored = ((zero.to(torch.int16) - int(v1)) % top).to(torch.uint8).t().contiguous()  # (G, out)
    tensors = {"qweight": _words(codes).t().contiguous(), "qzeros": _words(pack_codes(stored, scheme.bits)),
               "scales": scale.t().contiguous().to(torch.float16), "g_idx": g_idx}
    return tensors, (scheme.bits, -1 if gs == in_f else gs, scheme.symmetric)


def _one_grid(grids: dict[str, tuple[int, int, bool]], widths: dict[str, int]) -> tuple[int, int]:
    """The (bits, group_size) every layer fits (a one-group layer fits any group size at least its width)."""
    first = next(iter(grids))
    for name, (bits, gs, _) in grids.items():
        if bits != grids[first][0]:
            raise UnsupportedError(f"layer {name!r} is {bits}-bit and {first!r} {grids[first][0]}-bit: a GPTQ folder "
                                   "holds one bit width")
    sizes = {gs for _, gs, _ in grids.values() if gs != -1}
    group_size = min(sizes) if sizes else -1
    for name, (_, gs, _) in grids.items():
        if gs != group_size and not (gs == -1 and widths[name] <= group_size):
            what = "one group per row" if gs == -1 else f"groups of {gs}"
            raise UnsupportedError(f"layer {name!r} has {what} and others groups of {group_size}: a GPTQ folder "
                                   "holds one group size")
    return grids[first][0], group_size


def gptq_files(model: nn.Module, dtype: str = "float16", checkpoint_format: str = "gptq") -> dict[str, list[Any]]:
    """The files of the GPTQ-format folder of a causal LM, by relative name."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not valid for a GPTQ export: use one of {sorted(DTYPES)}")
    if checkpoint_format not in _CHECKPOINT_FORMATS:
        raise ConfigError(f"checkpoint format {checkpoint_format!r} is not valid: use one of "
                          f"{sorted(_CHECKPOINT_FORMATS)}")
    if not isinstance(model, CausalLM):
        raise UnsupportedError(f"a {type(model).__name__} has no GPTQ form: GPTQ folders hold causal LMs")
    inner = model.model
    output = inner.get_output_embeddings()
    layers = {name: m for name, m in inner.named_modules()
              if isinstance(getattr(m, "in_features", None), int) and m is not output and name}
    compressed = compressed_modules(inner)
    plain = sorted(name for name in layers if name not in compressed)
    if plain:
        raise UnsupportedError(f"layer {plain[0]!r} is float: a GPTQ runtime expects every Linear of the blocks "
                               "quantised; compress the model with a GPTQ or RTN recipe first (e.g. llm-q4)")
    written, grids = {}, {}
    for name in sorted(layers):
        made = gptq_layer(compressed[name].encoding, _CHECKPOINT_FORMATS[checkpoint_format])
        if isinstance(made, str):
            raise UnsupportedError(f"layer {name!r} has no GPTQ form: {made}; use a GPTQ or RTN recipe with bits "
                                   "2/3/4/8 and integer zero points (e.g. llm-q4)")
        written[name], grids[name] = made
    if not written:
        raise UnsupportedError("the model has no quantised Linear layers: compress it first (e.g. llm-q4)")
    bits, group_size = _one_grid(grids, {name: layers[name].in_features for name in written})
    symmetric = all(grid[2] for grid in grids.values())
    state = dense_state(inner, DTYPES[dtype], skip=frozenset(written))  # the GPTQ layers are never decoded
    fields = parse_json(model.support_files, "config.json")
    fields = {k: v for k, v in fields.items() if k != "quantization_config"}
    for name, kept in tied_parameters(inner).items():
        if name in state and kept in state and torch.equal(state[name], state[kept]):
            del state[name]  # stored once, as transformers ties it again
        else:
            fields["tie_word_embeddings"] = False
    for name, tensors in written.items():
        state.update({f"{name}.{part}": t for part, t in tensors.items()})
    settings = {"bits": bits, "group_size": group_size, "sym": symmetric, "checkpoint_format": checkpoint_format,
                "desc_act": any(isinstance(compressed[n].encoding, InputPermutedTensor) for n in written),
                "lm_head": False, "true_sequential": True}
    fields["quantization_config"] = {"quant_method": "gptq", **settings}
    fields["dtype"] = dtype
    fields["modelpress"] = {"version": __version__, "weights": f"GPTQ {checkpoint_format}",
                            "tensors": encoding_records(inner)}
    files: dict[str, list[Any]] = {rel: [data] for rel, data in model.support_files.items()}
    files["config.json"] = [json.dumps(fields, indent=2, sort_keys=True).encode("utf-8")]
    files[GPTQ_CONFIG] = [json.dumps({"quant_method": "gptq", **settings}, indent=2).encode("utf-8")]
    files["model.safetensors"] = tensorfile.serialise({k: v.contiguous() for k, v in state.items()},
                                                      {"format": "pt", "writer": "modelpress"})
    return files


def export_gptq(model_dir: str | Path | nn.Module, out: str | Path, dtype: str = "float16",
                checkpoint_format: str = "gptq") -> Path:
    """Write the causal LM of `model_dir` (a checkpoint, or any source `load_model` reads) as a GPTQ-format folder."""
    model = model_dir if isinstance(model_dir, nn.Module) else load_model(model_dir)
    return write_folder(out, gptq_files(model, dtype, checkpoint_format), protected=source_folders(model_dir))
