"""Greedy generation at batch 1, with the prefill and the decode steps timed apart.

Two engines give the tokens of transformers' `generate(do_sample=False)`:

- `Engine.TRANSFORMERS`: the model's own forward and its own cache, one call per token (what
  `generate` runs, without its logits processors, stopping criteria and output bookkeeping);
  any causal LM that transformers runs.
- `Engine.LEAN`: for the Llama family (`LEAN_MODEL_TYPES`: pre-norm blocks of q/k/v/o attention
  with rotary positions, grouped-query heads and a gated MLP), a loop over the model's own modules
  with a static KV cache allocated once, the rotary tables computed once, no masks (a causal
  prefill from position 0, then one query row per step), and the output layer run on the last
  position only. Every Linear, Embedding and norm is still called as the model's module, so
  compressed modules run their own kernels; only the glue between them is ours, written op for
  op as transformers writes it (RMSNorm, rotary, scaled_dot_product_attention with the same
  scale and grouped heads), so the logits are the same.

`Engine.AUTO` takes LEAN where the model has that shape and TRANSFORMERS elsewhere.

Threads in the decode steps: where most of a model's matmul weights run on modelpress's packed
kernel (nn/qmatmul.py), decode steps run torch on one thread and that kernel on all of torch's
threads. A decode step is ~200 kernel calls separated by small torch ops; with torch on two threads
its OpenMP worker spins after each of them on the core the kernel's own worker needs, and the
kernel waits for the scheduler. The small ops gain nothing from a second thread at one row. On this
2-core machine, quiet, SmolLM2 at 2 threads (benchmarks/results_llm.md): llm-q4 35.5 -> 54.6 tok/s,
llm-int8 42.1 -> 62.6 tok/s; under load the old setting took 486 ms per token, the split 79 ms.

Measured on the development machine (1 thread, a 30-layer 64-wide Llama whose compute is negligible,
so the time per token is framework time; machine busy, same run): transformers' `generate` 28.7 ms,
TRANSFORMERS 27.1 ms, LEAN 18.1 ms. `torch.compile` (inductor, dynamic shapes) of the LEAN step took
144 s to compile and ran at 21-24 ms per token against LEAN's 16 ms in the same run: not used.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ConfigError, UnsupportedError
from modelpress.nn.kernels import Kernel
from modelpress.nn.modules import CompressedLinear
from modelpress.nn.qmatmul import NATIVE_AVAILABLE, kernel_threads, supports_qmatmul

__all__ = ["Engine", "Generation", "LEAN_MODEL_TYPES", "decode_threads", "greedy_generate", "lean_supported",
           "packed_share"]

# transformers model types whose decoder layers compute exactly what the LEAN engine computes
LEAN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# their RMSNorm classes: weight * x * rsqrt(mean(x^2) + eps), which F.rms_norm computes in one call
_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})


class Engine(str, Enum):
    AUTO = "auto"  # LEAN where the model has its shape, else TRANSFORMERS
    TRANSFORMERS = "transformers"  # the model's own forward and cache
    LEAN = "lean"  # static KV cache and a loop over the model's own modules (Llama family)


@dataclass(frozen=True)
class Generation:
    """The new tokens of one greedy run (the first comes from the prefill) and the time of each phase."""

    tokens: tuple[int, ...]
    prompt_tokens: int
    prefill_s: float  # the prompt's forward and the first token's argmax
    decode_s: float  # every later token, one forward each
    engine: Engine

    @property
    def decoded(self) -> int:
        """Tokens produced by decode steps (all but the first)."""
        return max(len(self.tokens) - 1, 0)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.decoded == 0:
            return None
        return self.decoded / self.decode_s if self.decode_s > 0 else float("inf")


def greedy_generate(model: nn.Module, prompt: torch.Tensor | Sequence[int], new_tokens: int, *,
                    stop: Collection[int] = (), engine: Engine | str = Engine.AUTO) -> Generation:
    """Up to `new_tokens` greedy tokens after `prompt` (1-D ids), ending early after a token in `stop`."""
    ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ConfigError("the prompt has no tokens: give at least one token id")
    if new_tokens < 1:
        raise ConfigError(f"new_tokens={new_tokens}: ask for at least one token")
    try:
        engine = Engine(engine)
    except ValueError:
        raise ConfigError(f"unknown engine {engine!r}: use one of {[e.value for e in Engine]}") from None
    max_len = ids.numel() + new_tokens
    if engine is Engine.AUTO:
        engine = Engine.LEAN if lean_supported(model, max_len) else Engine.TRANSFORMERS
    if engine is Engine.LEAN and not lean_supported(model, max_len):
        raise UnsupportedError(f"the lean engine runs {sorted(LEAN_MODEL_TYPES)} decoders of the standard shape: "
                               "use engine 'transformers' for this model")
    step = _LeanDecoder(model, max_len) if engine is Engine.LEAN else _TransformersDecoder(model)
    with torch.inference_mode():
        return _greedy(step, ids, new_tokens, frozenset(stop), engine, decode_threads(model))


def _greedy(step, ids: torch.Tensor, new_tokens: int, stop: frozenset[int], engine: Engine,
            threads: contextlib.AbstractContextManager) -> Generation:
    """Prefill, then one decode step per token (inside `threads`); `step(ids (1, T), start)` returns the
    last position's logits."""
    start = time.perf_counter()
    token = int(step(ids[None], 0).argmax(-1))
    prefill_s = time.perf_counter() - start
    tokens, position = [token], ids.numel()
    start = time.perf_counter()
    with threads:
        while len(tokens) < new_tokens and token not in stop:
            token = int(step(torch.tensor([[token]]), position).argmax(-1))
            tokens.append(token)
            position += 1
    return Generation(tuple(tokens), ids.numel(), prefill_s, time.perf_counter() - start, engine)


PACKED_SHARE = 0.75  # the share of matmul weights on the packed kernel from which decode runs torch on one thread


def decode_threads(model: nn.Module) -> contextlib.AbstractContextManager:
    """How decode steps use the threads (module docstring): torch on one thread and the packed kernel on
    torch's count where at least PACKED_SHARE of the matmul weights run on that kernel, else as they are."""
    threads = torch.get_num_threads()
    if threads < 2 or packed_share(model) < PACKED_SHARE:
        return contextlib.nullcontext()
    return _torch_on_one_thread(threads)


def packed_share(model: nn.Module) -> float:
    """The share of the model's Linear weights (by count) that modelpress's packed kernel runs."""
    packed = total = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            n = module.in_features * module.out_features
            on_kernel = module.kernel in (Kernel.AUTO, Kernel.QMATMUL) and supports_qmatmul(module.encoding)
            packed += n if on_kernel and NATIVE_AVAILABLE else 0
        elif isinstance(module, nn.Linear):
            n = module.weight.numel()
        else:
            continue
        total += n
    return packed / total if total else 0.0


@contextlib.contextmanager
def _torch_on_one_thread(threads: int):
    with kernel_threads(threads):
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


# -- the model's own forward ---------------------------------------------------------------------------------


class _TransformersDecoder:
    """One forward of the whole model per call, carrying the cache it returns (transformers' own)."""

    def __init__(self, model: nn.Module):
        parameters = inspect.signature(model.forward).parameters
        self.model = model
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache = None

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        past = {} if start == 0 else {self.cache_name: self.cache}
        out = self.model(input_ids=ids, use_cache=True, **past, **self.last_only)
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1]  # (1, V)


# -- the lean loop over a Llama-family model's modules --------------------------------------------------------


def lean_supported(model: nn.Module, max_len: int) -> bool:
    """Whether `model` has exactly the Llama-family shape LEAN runs, for sequences of `max_len` tokens."""
    config, base = getattr(model, "config", None), getattr(model, "model", None)
    if getattr(config, "model_type", None) not in LEAN_MODEL_TYPES or base is None:
        return False
    if not hasattr(model, "lm_head") or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm",
                                                                              "rotary_emb")):
        return False
    if getattr(base.rotary_emb, "rope_type", "default") == "dynamic" or getattr(config, "pretraining_tp", 1) != 1:
        return False  # dynamic rope rescales per call; tensor-parallel slicing changes the sums
    window = getattr(config, "sliding_window", None)
    if window is not None and max_len > window:
        return False
    if len(base.layers) != config.num_hidden_layers:
        return False
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return False
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return False
        if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
    return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LeanDecoder:
    """A static KV cache of `max_len` positions and the decoder's forward written over its modules."""

    def __init__(self, model: nn.Module, max_len: int):
        config, base = model.config, model.model
        self.embed, self.layers, self.norm, self.head = base.embed_tokens, list(base.layers), base.norm, model.lm_head
        self.norms = [(_fused_norm(layer.input_layernorm), _fused_norm(layer.post_attention_layernorm))
                      for layer in self.layers]
        attn = self.layers[0].self_attn
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.heads = config.num_attention_heads
        self.gqa = config.num_attention_heads != config.num_key_value_heads
        dtype = _float_dtype(model)
        cos, sin = base.rotary_emb(torch.empty(1, 1, dtype=dtype), torch.arange(max_len)[None])  # (1, L, D) each
        self.cos, self.sin = cos[0], sin[0]  # (L, D)
        shape = (1, config.num_key_value_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in self.layers]

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        T = ids.shape[1]
        if T > 1 and start != 0:
            raise ConfigError("the lean engine prefills from position 0 only, then decodes one token per step")
        end = start + T
        cos, sin = self.cos[start:end], self.sin[start:end]  # (T, D)
        h = self.embed(ids)  # (1, T, C)
        for layer, (norm1, norm2), keys, values in zip(self.layers, self.norms, self.keys, self.values):
            attn = layer.self_attn
            x = norm1(h)
            qk = torch.cat((attn.q_proj(x), attn.k_proj(x)), -1).view(1, T, -1, self.head_dim).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin  # (1, H + Hkv, T, D): rotary on q and k at once
            q = qk[:, :self.heads]  # (1, H, T, D)
            keys[:, :, start:end] = qk[:, self.heads:]
            values[:, :, start:end] = attn.v_proj(x).view(1, T, -1, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], scale=self.scale,
                                               is_causal=T > 1, enable_gqa=self.gqa)  # (1, H, T, D)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, T, -1))
            h = h + layer.mlp(norm2(h))
        return self.head(self.norm(h[:, -1:]))[:, -1]  # (1, V)


def _fused_norm(module: nn.Module):
    """A float32 transformers RMSNorm as one F.rms_norm call (the same formula), any other norm as itself."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__ not in _RMS_NORMS or not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        return module
    if weight.dtype != torch.float32:
        return module  # transformers computes in float32 and casts back: not what F.rms_norm does in half precision
    return functools.partial(F.rms_norm, normalized_shape=tuple(weight.shape), weight=weight, eps=eps)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: the first floating parameter's (float32 when there is none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
