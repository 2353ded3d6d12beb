"""Per-input-channel scales of Linear layers, and the ops that can absorb them.

Activation-aware passes (AWQ, SmoothQuant) rewrite a Linear y = x W^T + b as

    y = (x diag(1/s)) (W diag(s))^T + b          s > 0, one entry per input channel,

and quantise W diag(s) instead of W. The 1/s must reach the input x. Three ways:

    LayerNorm   x = LN(z) and nothing else reads x: divide the LayerNorm's weight and bias by s.
    RMSNorm     the same for a pre-norm decoder's RMSNorm (weight only): x = w * z / rms(z).
    Linear rows x is a channel-for-channel linear function of a Linear's output (BERT's attention
                context softmax(Q K^T) V is, of the value projection's, head layout identical):
                divide that Linear's output rows and bias by s.
    explicit    nothing can absorb it: the layer keeps 1/s with its weight
                (`encodings.ChannelScaledTensor`) and multiplies x by it. A decode-once kernel
                applies it at decode time, for free; fbgemm's dynamic int8 kernel pays one
                elementwise pass over x per call (benchmarks/results_awq_smoothquant.md).

Which one applies is a fact of the architecture, so it is written down per architecture
(`find_sites`). For Llama-family decoder layers (Llama, Mistral, Qwen2: pre-RMSNorm, SwiGLU) every
Linear but one has an absorber: the RMSNorm in front of q/k/v (input_layernorm) and of gate/up
(post_attention_layernorm) reads the residual stream and nothing else reads its output; down_proj
reads act(gate) * up, which is linear in up's output channel for channel, so up's rows absorb it;
o_proj reads softmax(Q K^T) V, linear in v's rows, when each value head serves one query head.
With grouped-query attention a value channel feeds the same column of every query head of its
group, so o_proj's scale would have to be equal across the group: it keeps an explicit multiply.
For BERT encoders (post-LayerNorm) only the attention output projection has an
absorber: each LayerNorm output is both the next Linear's input and the residual that the next
LayerNorm adds back, so scaling it would change the residual stream (the tests show the
difference), and GELU is not scale-equivariant. q/k/v, the FFN's two Linears and the pooler
therefore keep explicit multiplies. An explicit layer needs no partner, so each one gets its own
scale; layers that share an absorber share one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from modelpress.encodings import DenseTensor, Encoding
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.errors import ConfigError, UnsupportedError
from modelpress.nn import Kernel, install

__all__ = [
    "Absorber",
    "FoldMode",
    "Site",
    "RMS_NORMS",
    "check_scale",
    "decoder_blocks",
    "find_sites",
    "fold_into_layernorm",
    "fold_into_rmsnorm",
    "fold_into_rows",
    "input_multiply",
    "migrate",
    "scale_columns",
    "share_groups",
    "target_sites",
    "with_input_scale",
]


class Absorber(str, Enum):
    LAYERNORM = "layernorm"  # divide a LayerNorm's weight and bias by s
    RMSNORM = "rmsnorm"  # divide an RMSNorm's weight by s (Llama-family pre-norm decoders)
    LINEAR_ROWS = "linear_rows"  # divide a Linear's output rows and bias by s
    EXPLICIT = "explicit"  # the layer multiplies its own input by 1/s


class FoldMode(str, Enum):
    AUTO = "auto"  # the architecture's producer map (BERT encoders, Llama-family decoders); others are refused
    EXPLICIT = "explicit"  # every layer keeps its own scale as an input multiply: any architecture


@dataclass(frozen=True)
class Site:
    """Where a Linear's input scale goes: the absorbing module (None for an explicit multiply) and why."""

    absorber: Absorber
    producer: str | None
    why: str


# ---------------------------------------------------------------------------------------------
# The primitives (module surgery on float modules, in place)


def check_scale(s: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    """s as a (channels,) float32 tensor of finite positive values, or a ConfigError."""
    if s.dim() != 1 or s.shape[0] != channels:
        raise ConfigError(f"{where}: a channel scale needs {channels} entries, got shape {tuple(s.shape)}")
    s = s.detach().float()
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ConfigError(f"{where}: channel scales must be finite and positive; check the calibration statistics")
    return s


def _float_linear(module: nn.Module, role: str) -> nn.Linear:
    if type(module) is not nn.Linear:  # a compressed layer's weight is its encoding, not a parameter
        raise UnsupportedError(f"a channel scale can only move through a float nn.Linear, and the {role} is a "
                               f"{type(module).__name__}: scale before compressing it, or use fold: explicit")
    return module


def scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    """W <- W diag(s): the consumer's side of the migration."""
    w = _float_linear(linear, "consumer").weight.data
    w.mul_(s.to(w.dtype))  # (R, C) * (C,)


def fold_into_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    """Divide a Linear's output rows (and bias) by s, so that its output becomes y / s."""
    w = _float_linear(linear, "producer").weight.data
    w.div_(s.to(w.dtype)[:, None])  # (R, C) / (R, 1)
    if linear.bias is not None:
        linear.bias.data.div_(s.to(linear.bias.dtype))


def fold_into_layernorm(norm: nn.LayerNorm, s: torch.Tensor) -> None:
    """Divide a LayerNorm's affine weight and bias by s, so that its output becomes LN(z) / s."""
    if norm.weight is None:
        raise UnsupportedError("a LayerNorm without elementwise_affine cannot absorb a channel scale: "
                               "use fold: explicit")
    norm.weight.data.div_(s.to(norm.weight.dtype))
    if norm.bias is not None:
        norm.bias.data.div_(s.to(norm.bias.dtype))


# RMSNorms computing w * z / rms(z) (Gemma's computes (1 + w) * ..., which a division of w does not scale)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


def fold_into_rmsnorm(norm: nn.Module, s: torch.Tensor) -> None:
    """Divide an RMSNorm's weight by s, so that its output becomes RMSNorm(z) / s."""
    weight = getattr(norm, "weight", None)
    if type(norm).__name__ not in RMS_NORMS or not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
        raise UnsupportedError(f"a {type(norm).__name__} is not an RMSNorm of the form w * z / rms(z) with "
                               f"{len(s)} weights (known: {', '.join(RMS_NORMS)}): use fold: explicit")
    weight.data.div_(s.to(weight.dtype))


def with_input_scale(encoding: Encoding, inverse: torch.Tensor | None) -> Encoding:
    """The encoding of W diag(s) with the layer's input multiply 1/s attached (unchanged for None)."""
    return encoding if inverse is None else ChannelScaledTensor(encoding, inverse.float().contiguous())


def input_multiply(model: nn.Module, name: str, inverse: torch.Tensor) -> None:
    """Keep 1/s as an explicit multiply in a float Linear (whose weight already holds W diag(s))."""
    weight = DenseTensor(model.get_submodule(name).weight.detach().float().clone())
    install(model, name, with_input_scale(weight, inverse), Kernel.DENSE)


def migrate(model: nn.Module, consumers: list[str], site: Site, s: torch.Tensor) -> torch.Tensor | None:
    """Scale the consumers' weights by s and hand 1/s to the site's absorber.

    Returns 1/s when the consumers must multiply their inputs themselves (an explicit site): the
    caller keeps it with their (quantised) weights through `with_input_scale`.
    """
    linears = [model.get_submodule(n) for n in consumers]
    s = check_scale(s, linears[0].in_features, consumers[0])
    for linear in linears:
        scale_columns(linear, s)
    if site.absorber is Absorber.EXPLICIT:
        return 1.0 / s
    producer = model.get_submodule(site.producer)
    if site.absorber is Absorber.LAYERNORM:
        fold_into_layernorm(producer, s)
    elif site.absorber is Absorber.RMSNORM:
        fold_into_rmsnorm(producer, s)
    else:
        fold_into_rows(producer, s)
    return None


# ---------------------------------------------------------------------------------------------
# Where each layer's input comes from: one explicit map per known architecture


_EXPLICIT_WHY = {
    "attention.self.query": "its input, the block input, is also the residual of attention.output.LayerNorm",
    "attention.self.key": "its input, the block input, is also the residual of attention.output.LayerNorm",
    "attention.self.value": "its input, the block input, is also the residual of attention.output.LayerNorm",
    "intermediate.dense": "its input, attention.output.LayerNorm's output, is also the residual of output.LayerNorm",
    "output.dense": "its input is GELU(intermediate.dense(x)), and GELU does not commute with a scale",
}


def find_sites(model: nn.Module, names: list[str], mode: FoldMode | str = FoldMode.AUTO) -> dict[str, Site]:
    """The Site of each named Linear: its absorber under the architecture's map, or explicit."""
    mode = FoldMode(mode)
    if mode is FoldMode.EXPLICIT:
        return {n: Site(Absorber.EXPLICIT, None, "fold: explicit") for n in names}
    decoders = decoder_blocks(model)
    if decoders:
        return {n: _decoder_site(model, n, decoders) for n in names}
    blocks = _bert_blocks(model)
    if not blocks:
        raise UnsupportedError(
            f"no channel-scale map for a {type(model).__name__} (known: BERT encoders, Llama-family decoders): "
            "set fold: explicit to keep each scale as a per-channel input multiply"
        )
    return {n: _bert_site(model, n, blocks) for n in names}


def target_sites(model: nn.Module, targets: list) -> dict[str, Site]:
    """The Site of each pass target (`.name`), under the `fold` mode of its own config."""
    sites: dict[str, Site] = {}
    for mode in sorted({t.config.fold for t in targets}, key=lambda m: m.value):  # an order no hash seed changes
        sites.update(find_sites(model, [t.name for t in targets if t.config.fold is mode], mode))
    return sites


def _bert_blocks(model: nn.Module) -> list[str]:
    """Names of the model's BERT encoder layers (transformers' BertLayer)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "BertLayer"
            and all(_has(m, p) for p in ("attention.self.value", "attention.output.dense", "output.dense"))]


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _bert_site(model: nn.Module, name: str, blocks: list[str]) -> Site:
    block = next((b for b in blocks if name.startswith(b + ".")), None)
    if block is None:
        return Site(Absorber.EXPLICIT, None, "outside the encoder layers (e.g. the pooler): no producer is known")
    local = name[len(block) + 1:]
    if local == "attention.output.dense":
        value = f"{block}.attention.self.value"
        producer = model.get_submodule(value)
        if type(producer) is not nn.Linear:  # already compressed by an earlier stage: its rows are fixed
            return Site(Absorber.EXPLICIT, None, f"{value} was already rewritten by an earlier stage")
        return Site(Absorber.LINEAR_ROWS, value, "the context softmax(QK^T) V is linear in V, channel for channel")
    if local in _EXPLICIT_WHY:
        return Site(Absorber.EXPLICIT, None, _EXPLICIT_WHY[local])
    return Site(Absorber.EXPLICIT, None, "not a known BERT layer: no producer is known")


_DECODER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decoder_blocks(model: nn.Module) -> list[str]:
    """Names of the model's Llama-family decoder layers: pre-RMSNorm attention with separate q/k/v/o
    projections, then a pre-RMSNorm SwiGLU (gate_proj, up_proj, down_proj)."""
    return [name for name, m in model.named_modules()
            if all(_has(m, p) for p in _DECODER_PARTS)
            and all(type(m.get_submodule(p)).__name__ in RMS_NORMS for p in _DECODER_PARTS[:2])]


def _decoder_site(model: nn.Module, name: str, blocks: list[str]) -> Site:
    block = next((b for b in blocks if name.startswith(b + ".")), None)
    if block is None:
        return Site(Absorber.EXPLICIT, None, "outside the decoder layers (e.g. lm_head, whose weight may be tied to "
                    "the embedding, which must not be rescaled)")
    local = name[len(block) + 1:]
    if local in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return Site(Absorber.RMSNORM, f"{block}.input_layernorm", "pre-norm: the RMSNorm output feeds only q/k/v")
    if local in ("mlp.gate_proj", "mlp.up_proj"):
        return Site(Absorber.RMSNORM, f"{block}.post_attention_layernorm",
                    "pre-norm: the RMSNorm output feeds only gate/up")
    if local == "mlp.down_proj":
        return _rows_site(model, f"{block}.mlp.up_proj", "down_proj reads act(gate) * up, linear in up's rows")
    if local == "self_attn.o_proj":
        attn = model.get_submodule(f"{block}.self_attn")
        if getattr(attn, "num_key_value_groups", None) != 1:
            return Site(Absorber.EXPLICIT, None, "grouped-query attention: a value channel feeds several query heads' "
                        "columns of o_proj, which would all need one scale")
        return _rows_site(model, f"{block}.self_attn.v_proj", "softmax(QK^T) V is linear in V, channel for channel")
    return Site(Absorber.EXPLICIT, None, "not a known decoder layer: no producer is known")


def _rows_site(model: nn.Module, producer: str, why: str) -> Site:
    if type(model.get_submodule(producer)) is not nn.Linear:  # already compressed by an earlier stage
        return Site(Absorber.EXPLICIT, None, f"{producer} was already rewritten by an earlier stage")
    return Site(Absorber.LINEAR_ROWS, producer, why)


def share_groups(names: list[str], sites: dict[str, Site]) -> list[list[str]]:
    """Layers (of one calibration group, which read the same input) that must share one scale.

    Layers with the same absorber share it; each explicit layer gets a scale of its own.
    """
    groups: dict[object, list[str]] = {}
    for n in names:
        key = n if sites[n].absorber is Absorber.EXPLICIT else (sites[n].absorber, sites[n].producer)
        groups.setdefault(key, []).append(n)
    return list(groups.values())
