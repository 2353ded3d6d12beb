"""GPTQ-format folders of tiny causal LMs, packed by a plain-numpy packer written from the format's description.

The packer shares nothing with modelpress: each `bits`-bit field j of a row goes to bits [j*bits, (j+1)*bits)
of a little-endian stream of 32-bit words (a field that straddles two words is split between them), placed
with integer shifts into uint64 accumulators. qweight packs along the input dimension (one column per
output), qzeros along the output dimension; v1 (`gptq`) stores each zero point minus one, modulo 2^bits.
The reference weight is the format's formula, in float64: w[o, i] = (q[o, i] - z[g_idx[i], o]) * s[g_idx[i], o].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from _tiny_lm import write_tiny_lm

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2: weights stored (in, out)


def pack_fields(values: np.ndarray, bits: int) -> np.ndarray:
    """(R, n) ints in [0, 2^bits) -> (R, n * bits / 32) int32: each row a stream of 32-bit words."""
    rows, n = values.shape
    assert (n * bits) % 32 == 0
    words = np.zeros((rows, n * bits // 32), dtype=np.uint64)
    for j in range(n):
        v = values[:, j].astype(np.uint64)
        start = j * bits
        word, offset = divmod(start, 32)
        words[:, word] |= (v << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        if offset + bits > 32:  # the field's high bits spill into the next word
            words[:, word + 1] |= v >> np.uint64(32 - offset)
    return words.astype(np.uint32).view(np.int32)


def unpack_fields(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """(R, W) int32 words -> (R, n) fields: the inverse of pack_fields, bit by bit from the same description."""
    w = words.view(np.uint32).astype(np.uint64)
    out = np.zeros((w.shape[0], n), dtype=np.int64)
    for j in range(n):
        for b in range(bits):
            word, offset = divmod(j * bits + b, 32)
            out[:, j] |= ((w[:, word] >> np.uint64(offset)) & np.uint64(1)).astype(np.int64) << b
    return out


@dataclass
class Layer:
    """The truth one GPTQ layer was packed from."""

    q: np.ndarray  # (out, in) codes
    z: np.ndarray  # (G, out) zero points (as the runtime subtracts them)
    s: np.ndarray  # (G, out) float16 scales
    g_idx: np.ndarray  # (in,) group of each input column

    def reference(self) -> np.ndarray:
        """(out, in) float64 weight by the format's formula."""
        z = self.z.astype(np.float64)[self.g_idx].T  # (out, in)
        s = self.s.astype(np.float64)[self.g_idx].T
        return (self.q.astype(np.float64) - z) * s


@dataclass
class Spec:
    bits: int = 4
    group_size: int = 32
    sym: bool = True
    v1: bool = True
    desc_act: bool = False
    arch: str = "llama"
    in_config_json: bool = True  # else quantize_config.json
    extra: dict = field(default_factory=dict)  # more quantization_config fields
    zero_zeros: bool = False  # asym v1: let zero points be 0 (stored as all ones, read two ways)


def gptq_layer(rng: np.random.Generator, out_f: int, in_f: int, spec: Spec) -> Layer:
    gs = in_f if spec.group_size == -1 else spec.group_size
    groups = -(-in_f // gs)
    top = 1 << spec.bits
    q = rng.integers(0, top, size=(out_f, in_f))
    if spec.sym:
        z = np.full((groups, out_f), top // 2)
    else:
        z = rng.integers(0 if spec.zero_zeros or not spec.v1 else 1, top, size=(groups, out_f))
    s = (rng.random((groups, out_f)) * 0.02 + 0.001).astype(np.float16)
    g_idx = np.arange(in_f) // gs
    if spec.desc_act:
        order = rng.permutation(in_f)  # GPTQ's act order: the j-th column quantised is order[j]
        g_idx = np.empty(in_f, dtype=np.int64)
        g_idx[order] = np.arange(in_f) // gs
    return Layer(q=q, z=z, s=s, g_idx=g_idx)


def layer_tensors(layer: Layer, spec: Spec) -> dict[str, torch.Tensor]:
    stored_z = (layer.z - 1) % (1 << spec.bits) if spec.v1 else layer.z
    return {
        "qweight": torch.from_numpy(pack_fields(layer.q, spec.bits).T.copy()),  # (in words, out)
        "qzeros": torch.from_numpy(pack_fields(stored_z, spec.bits)),
        "scales": torch.from_numpy(layer.s.copy()),
        "g_idx": torch.from_numpy(layer.g_idx.astype(np.int32)),
    }


def write_gptq_folder(folder: Path, spec: Spec, seed: int = 0, tamper=None) -> dict[str, Layer]:
    """A tiny `spec.arch` model's Linears (in every block) as GPTQ layers of `spec`, the rest float16, written
    as a Hugging Face folder; returns the truth per layer name. `tamper(tensors)` may edit the tensors first."""
    from safetensors.torch import load_file, save_file

    write_tiny_lm(spec.arch, folder, seed)
    state = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(seed)
    truth: dict[str, Layer] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.rpartition(".")[0]
        conv1d = any(name.endswith(c) for c in CONV1D)
        if key.endswith(".weight") and (conv1d or any(name.endswith(lin) for lin in LINEARS)):
            out_f, in_f = value.shape[::-1] if conv1d else value.shape
            truth[name] = gptq_layer(rng, out_f, in_f, spec)
            tensors.update({f"{name}.{part}": t for part, t in layer_tensors(truth[name], spec).items()})
        else:
            tensors[key] = value.to(torch.float16)
    if tamper is not None:
        tamper(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    settings = {"bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.desc_act, "sym": spec.sym,
                "checkpoint_format": "gptq" if spec.v1 else "gptq_v2", **spec.extra}
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float16"  # as GPTQ folders are
    if spec.in_config_json:
        config["quantization_config"] = {"quant_method": "gptq", **settings}
    else:
        (folder / "quantize_config.json").write_text(json.dumps(settings))
    (folder / "config.json").write_text(json.dumps(config))
    return truth
