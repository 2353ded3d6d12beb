"""ONNX exports of sentence encoders, run by ONNX Runtime with the compressed weights as they are.

    model.onnx        inputs input_ids, attention_mask, token_type_ids (int64, batch x sequence, both dynamic);
                      outputs last_hidden_state (B, T, C) and sentence_embedding (B, C: the encoder's pooling
                      and normalisation). Each compressed layer is written as exports/onnx_ops.py says: W8A8
                      layers as dynamic uint8 x int8 matmuls (ORT's own fused kernel), weight-only ones from
                      their stored codes; float layers as torch.onnx writes them (opset 17, TorchScript exporter)
    tokenizer.json, config.json and the sentence-transformers files, as the model keeps them

The codes and scales are modelpress's own (no requantisation), so ONNX Runtime computes what modelpress
computes, up to float rounding (the tests hold it to cosine >= 0.9999 on every sentence).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from modelpress.errors import UnsupportedError
from modelpress.exports.hf_folder import compressed_modules, write_folder
from modelpress.exports.onnx_ops import onnx_stand_in
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.hf import SentenceEncoder
from modelpress.formats.models import load_model

__all__ = ["ONNX_FILE", "ONNX_INPUTS", "ONNX_OUTPUTS", "OPSET", "export_onnx", "onnx_bytes"]

ONNX_FILE = "model.onnx"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OUTPUTS = ("last_hidden_state", "sentence_embedding")
OPSET = 17
MAX_ONNX_BYTES = 2**31 - 1  # one protobuf message; larger models need external data (not written yet)
_TRACE_SENTENCES = ["A short one.", "A somewhat longer sentence, so that the batch needs padding."]


def export_onnx(model_dir: str | Path, out: str | Path) -> Path:
    """Write the sentence encoder of `model_dir` (a checkpoint, or any source load_model reads) as an ONNX folder."""
    model = load_model(model_dir)
    files = {ONNX_FILE: [onnx_bytes(model)], **{rel: [data] for rel, data in model.support_files.items()}}
    return write_folder(out, files, protected=[model_dir] if Path(model_dir).exists() else [])


class _EncoderGraph(nn.Module):
    """The encoder with positional inputs and both outputs, the shape torch.onnx wants."""

    def __init__(self, encoder: SentenceEncoder):
        super().__init__()
        self.model, self.config = encoder.model, encoder.config

    def forward(self, input_ids, attention_mask, token_type_ids):
        states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state  # (B, T, C)
        if self.config.pooling == "cls":
            pooled = states[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, C)
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return states, pooled


def onnx_bytes(encoder: nn.Module) -> bytes:
    """The ONNX model of a sentence encoder (its compressed layers replaced by their ONNX stand-ins in place)."""
    if isinstance(encoder, CausalLM):
        raise UnsupportedError("the ONNX export writes sentence encoders; for a causal LM export a Hugging Face "
                               "folder (--format hf) or GGUF (--format gguf)")
    if not isinstance(encoder, SentenceEncoder):
        raise UnsupportedError(f"a {type(encoder).__name__} has no ONNX export: export a sentence encoder")
    for name, module in compressed_modules(encoder.model).items():
        encoder.model.set_submodule(name, onnx_stand_in(name, module))
    graph = _EncoderGraph(encoder).eval()
    trace = encoder.tokenize(_TRACE_SENTENCES)
    axes = {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated; tracer warnings come from transformers' mask code (shape
        # comparisons that are constant for this model; the tests run other batch and sequence sizes).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(graph, tuple(trace[k] for k in ONNX_INPUTS), buffer, dynamo=False, opset_version=OPSET,
                          input_names=list(ONNX_INPUTS), output_names=list(ONNX_OUTPUTS),
                          dynamic_axes={**{k: axes for k in ONNX_INPUTS}, ONNX_OUTPUTS[0]: axes,
                                        ONNX_OUTPUTS[1]: {0: "batch"}},
                          do_constant_folding=False)  # ORT folds at load; here it would widen the codes to float
    data = buffer.getvalue()
    if len(data) > MAX_ONNX_BYTES:
        raise UnsupportedError(f"the ONNX model is {len(data)} bytes, over protobuf's 2 GiB: export a smaller model")
    return data
