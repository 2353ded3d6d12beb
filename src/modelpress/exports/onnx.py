"""ONNX exports of sentence encoders and causal LMs, run by ONNX Runtime with the compressed weights as they are.

    model.onnx        a sentence encoder: inputs input_ids, attention_mask, token_type_ids (int64, batch x
                      sequence, both dynamic); outputs last_hidden_state (B, T, C) and sentence_embedding (B, C:
                      the encoder's pooling and normalisation).
                      a causal LM: inputs input_ids, attention_mask; output logits (B, T, vocab), the whole
                      sequence scored at once (no key/value cache: for scoring, not for fast decoding).
                      Each compressed layer is written as exports/onnx_ops.py says: W8A8 layers as dynamic
                      uint8 x int8 matmuls (ORT's own fused kernel), symmetric 4-bit ones as MatMulNBits,
                      other weight-only ones from their stored codes; float layers as torch.onnx writes them
                      (opset 17, TorchScript exporter)
    tokenizer.json, config.json and the other support files, as the model keeps them

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
from modelpress.exports.hf_folder import compressed_modules, source_folders, write_folder
from modelpress.exports.onnx_ops import OnnxNBitsLinear, onnx_stand_in
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.hf import SentenceEncoder, pool_states
from modelpress.formats.models import load_model

__all__ = ["ONNX_FILE", "ONNX_INPUTS", "ONNX_OUTPUTS", "OPSET", "export_onnx", "onnx_bytes"]

ONNX_FILE = "model.onnx"
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OUTPUTS = ("last_hidden_state", "sentence_embedding")
LM_INPUTS, LM_OUTPUTS = ("input_ids", "attention_mask"), ("logits",)
OPSET = 17
MAX_ONNX_BYTES = 2**31 - 1  # one protobuf message; larger models need external data (not written yet)
_TRACE_SENTENCES = ["A short one.", "A somewhat longer sentence, so that the batch needs padding."]


def export_onnx(model_dir: str | Path | nn.Module, out: str | Path) -> Path:
    """Write the sentence encoder or causal LM of `model_dir` (a checkpoint, or any source load_model reads) as an
    ONNX folder."""
    model = model_dir if isinstance(model_dir, nn.Module) else load_model(model_dir)  # loaded, or a source
    files = {ONNX_FILE: [onnx_bytes(model)], **{rel: [data] for rel, data in model.support_files.items()}}
    return write_folder(out, files, protected=source_folders(model_dir))


class _EncoderGraph(nn.Module):
    """The encoder with positional inputs and both outputs, the shape torch.onnx wants."""

    def __init__(self, encoder: SentenceEncoder):
        super().__init__()
        self.model, self.config = encoder.model, encoder.config

    def forward(self, input_ids, attention_mask, token_type_ids):
        states = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state  # (B, T, C)
        return states, pool_states(states, attention_mask, self.config)


class _CausalLMGraph(nn.Module):
    """transformers' causal LM scoring a whole sequence: (input_ids, attention_mask) -> logits."""

    def __init__(self, lm: CausalLM):
        super().__init__()
        self.model = lm.model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def onnx_bytes(model: nn.Module) -> bytes:
    """The ONNX model of a sentence encoder or causal LM (its compressed layers replaced by their ONNX stand-ins,
    in place)."""
    if not isinstance(model, (SentenceEncoder, CausalLM)):
        raise UnsupportedError(f"a {type(model).__name__} has no ONNX export: export a sentence encoder or a causal LM")
    stand_ins = {name: onnx_stand_in(name, module) for name, module in compressed_modules(model.model).items()}
    for name, stand_in in stand_ins.items():
        model.model.set_submodule(name, stand_in)
    contrib = {"com.microsoft": 1} if any(isinstance(m, OnnxNBitsLinear) or getattr(m, "per_row", False)
                                          for m in stand_ins.values()) else {}  # MatMulNBits, MatMulIntegerToFloat
    axes = {0: "batch", 1: "sequence"}
    trace = model.tokenize(_TRACE_SENTENCES)
    if isinstance(model, CausalLM):
        graph, inputs, outputs = _CausalLMGraph(model).eval(), LM_INPUTS, LM_OUTPUTS
        dynamic = {k: axes for k in (*inputs, *outputs)}
    else:
        graph, inputs, outputs = _EncoderGraph(model).eval(), ONNX_INPUTS, ONNX_OUTPUTS
        dynamic = {**{k: axes for k in inputs}, outputs[0]: axes, outputs[1]: {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated; tracer warnings come from transformers' mask code (shape
        # comparisons that are constant for this model; the tests run other batch and sequence sizes).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(graph, tuple(trace[k] for k in inputs), buffer, dynamo=False, opset_version=OPSET,
                          input_names=list(inputs), output_names=list(outputs), dynamic_axes=dynamic,
                          custom_opsets=contrib,  # MatMulNBits, MatMulIntegerToFloat
                          do_constant_folding=False)  # ORT folds at load; here it would widen the codes to float
    data = buffer.getvalue()
    if len(data) > MAX_ONNX_BYTES:
        raise UnsupportedError(f"the ONNX model is {len(data)} bytes, over protobuf's 2 GiB: export a smaller model")
    return data

