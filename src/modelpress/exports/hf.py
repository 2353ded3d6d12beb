"""Hugging Face folders from modelpress models: `transformers` / `sentence-transformers` load them as they are.

    model.safetensors   every weight dequantised to float16 or bfloat16 (`dtype`), under transformers' names
                        (a tied output layer stored once; GPT-2's Conv1D weights transposed back to (in, out))
    config.json         the model's own, with `dtype` set and a `modelpress` entry recording what each
                        compressed tensor was (its encoding: kind, bits, symmetry, group size, and the
                        activation kernel where modelpress quantised activations) and the recipe
    tokenizer and the other support files, as modelpress keeps them (a sentence encoder's modules.json,
    pooling and sentence-bert configs included, so SentenceTransformer(folder) rebuilds it)

The weights are dequantised: a model whose layers quantise activations (W8A8) runs here on the same
weights with float activations (recorded as `activations` in the entry). A quantised folder in the
compressed-tensors format is not written: see docs (issue 15's report) for why.

Before anything is written the weights are checked against the skeleton transformers builds from the
config (meta device, no allocation): a model whose shapes the config cannot describe (e.g. per-layer
widths left by structured pruning) is refused with the names that do not fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress._version import __version__
from modelpress.errors import ConfigError, UnsupportedError
from modelpress.exports.hf_compressed import compressed_tensors_state, quantization_config
from modelpress.exports.hf_folder import dense_state, encoding_records, source_folders, write_folder
from modelpress.formats import tensorfile
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.hf import SentenceEncoder, parse_json
from modelpress.formats.models import load_model
from modelpress.nn.provenance import provenance
from modelpress.nn.tying import tied_parameters

__all__ = ["DTYPES", "EXPORT_KEY", "export_hf", "hf_files"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EXPORT_KEY = "modelpress"  # the config.json entry recording the quantisation
WEIGHTS_FILE = "model.safetensors"
_METADATA = {"format": "pt", "writer": "modelpress"}


def export_hf(model_dir: str | Path | nn.Module, out: str | Path, dtype: str = "float16",
              quantized: bool = False) -> Path:
    """Write the model of `model_dir` (a checkpoint, or any source `load_model` reads) as a Hugging Face folder;
    `quantized`: Linear weights in the compressed-tensors format (exports/hf_compressed.py) instead of dequantised."""
    model = model_dir if isinstance(model_dir, nn.Module) else load_model(model_dir)  # loaded, or a source
    return write_folder(out, hf_files(model, dtype, quantized),
                        protected=source_folders(model_dir))


def hf_files(model: nn.Module, dtype: str = "float16", quantized: bool = False) -> dict[str, list[Any]]:
    """The files of the Hugging Face folder of `model` (a CausalLM or SentenceEncoder), by relative name."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not valid for a Hugging Face export: use one of {sorted(DTYPES)}")
    if not isinstance(model, (CausalLM, SentenceEncoder)):
        raise UnsupportedError(f"a {type(model).__name__} has no Hugging Face form: export a causal LM or a "
                               "sentence encoder (other models: save a modelpress checkpoint)")
    inner = model.model
    fields = parse_json(model.support_files, "config.json")
    fields = {k: v for k, v in fields.items() if k != "quantization_config"}
    skeleton = _skeleton(fields, isinstance(model, CausalLM))
    state = _fit(dense_state(inner, DTYPES[dtype]), skeleton)
    ties = tied_parameters(skeleton)
    tied = {}
    if any(not torch.equal(state[name], state[kept]) for name, kept in ties.items()):
        fields["tie_word_embeddings"] = False  # a recipe gave the output layer its own weight
    else:
        state = {k: v for k, v in state.items() if k not in ties}
        tied = {name.removesuffix(".weight") for name in ties}  # stays the embedding's (dense) tensor
    if quantized:
        packed, groups = compressed_tensors_state(inner, DTYPES[dtype], skip=tied)
        state = {k: v for k, v in state.items() if k[: -len(".weight")] + ".weight_packed" not in packed}
        state.update(packed)
        fields["quantization_config"] = quantization_config(groups)
    fields["dtype"] = dtype
    how = "compressed-tensors pack-quantized" if quantized else f"dequantized to {dtype}"
    fields[EXPORT_KEY] = {"version": __version__, "weights": how,
                          "recipe": provenance(model).recipe, "tensors": encoding_records(inner)}
    files: dict[str, list[Any]] = {rel: [data] for rel, data in model.support_files.items()}
    files["config.json"] = [json.dumps(fields, indent=2, sort_keys=True).encode("utf-8")]
    files[WEIGHTS_FILE] = tensorfile.serialise({k: v.contiguous() for k, v in state.items()}, _METADATA)
    return files


def _skeleton(fields: dict[str, Any], causal: bool) -> nn.Module:
    """transformers' model for the config, on the meta device (what from_pretrained will build)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.for_model(**fields)
    with torch.device("meta"):
        return (AutoModelForCausalLM if causal else AutoModel).from_config(config)


def _fit(state: dict[str, torch.Tensor], skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """`state` under the skeleton's names and shapes: Conv1D weights transposed back; anything else refused."""
    from transformers.pytorch_utils import Conv1D

    conv1d = {f"{name}.weight" for name, m in skeleton.named_modules() if isinstance(m, Conv1D)}
    state = {k: (v.t() if k in conv1d else v) for k, v in state.items()}
    expected = skeleton.state_dict()
    ties = tied_parameters(skeleton)
    missing = [k for k in expected if k not in state and k not in ties]
    for name, kept in ties.items():
        if name not in state and kept in state:
            state[name] = state[kept]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (config: {tuple(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or wrong:
        raise UnsupportedError(
            f"the model's weights do not fit its config.json (missing {missing[:3]}, extra {extra[:3]}, shapes "
            f"{wrong[:3]}): a Hugging Face folder holds one width per layer kind; export a model compressed "
            "without structured pruning (e.g. the llm-q4 or int8 preset)")
    return {k: state[k] for k in expected if k in state}

