"""Hugging Face causal-LM folders in, a `CausalLM` that generates out.

`CausalLM` wraps a transformers `*ForCausalLM` model (Llama, Qwen2, Mistral, Phi-3, GPT-2, ...), its
tokenizer and its support files as bytes (config.json, generation_config.json, tokenizer.json,
tokenizer_config.json, chat_template.jinja): a checkpoint or a store version rebuilds it from those
bytes alone, with no folder on disk (`causal_lm_from_files`). Calling it scores tokens (`.logits`),
`generate()` is transformers' own.

Every pass sees `nn.Linear` layers: GPT-2's `Conv1D` (a Linear with its weight stored transposed)
becomes an `nn.Linear` when the model is built (`linearise_conv1d`). A tied output layer stays tied
to the embedding table: the skeleton ties them as transformers does, loading and saving keep one
copy (nn/tying.py). Only safetensors weights are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from modelpress.errors import FormatError, ModelNotFoundError, ModelpressError
from modelpress.formats.hf import (bad_file, check_state, materialise_buffers, parse_json, read_support_files,
                                  source_state, weights_file)
from modelpress.nn.tying import record_ties, retie, tied_parameters

__all__ = ["CAUSAL_LM_FILES", "CausalLM", "build_causal_lm", "causal_lm_from_files", "causal_lm_tokenizer",
           "fill_causal_lm", "is_causal_lm_config", "linearise_conv1d"]

# Files that describe a causal LM without holding weights (read from a source folder, kept as bytes).
CAUSAL_LM_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # LlamaForCausalLM, GPT2LMHeadModel, ...
# What transformers' pipelines and trainers read from a model: asked of the wrapper, the error says to unwrap it.
_TRANSFORMERS_MODEL_ATTRIBUTES = frozenset({"config", "device", "dtype", "generation_config", "can_generate"})


def is_causal_lm_config(fields: Any) -> bool:
    """Whether a parsed config.json describes a causal language model (by its `architectures`)."""
    names = fields.get("architectures") if isinstance(fields, dict) else None
    return isinstance(names, list) and any(isinstance(n, str) and n.endswith(_HEAD_SUFFIXES) for n in names)


class CausalLM(nn.Module):
    """A decoder language model: `self.model` (transformers' *ForCausalLM), its tokenizer and support files."""

    def __init__(self, model: nn.Module, tokenizer, files: Mapping[str, bytes], source: Path | None = None):
        super().__init__()
        unknown = sorted(set(files) - set(CAUSAL_LM_FILES))
        if unknown:  # names come from manifests and catalogues: only the known files, never a path
            raise FormatError(f"unexpected support file(s) {unknown[:3]}; allowed are {list(CAUSAL_LM_FILES)}")
        self.model = model
        self.tokenizer = tokenizer  # transformers' fast tokenizer (encode, decode, apply_chat_template)
        self.support_files = dict(files)
        self.source = source  # the folder or .gguf file it was read from, if any
        record_ties(self)  # the embedding and output layer stay one tensor even if a pass rebinds one of them

    # No `config` attribute of its own: code that runs transformers models unwraps `.model` (which has one).
    # transformers' own tools take that model too: pipeline("text-generation", model=lm.model, tokenizer=lm.tokenizer)
    # (or `lm.pipeline()`); `lm.model.generate(...)` is transformers' generate, compressed layers inside.

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError as exc:
            if name in _TRANSFORMERS_MODEL_ATTRIBUTES:
                raise AttributeError(f"{exc}: a CausalLM wraps transformers' model; give `lm.model` (and "
                                     "`lm.tokenizer`) to transformers, e.g. pipeline(..., model=lm.model)") from None
            raise

    def pipeline(self, task: str = "text-generation", **kwargs):
        """transformers' `pipeline(task)` running this model (its compressed layers) with its tokenizer."""
        from transformers import pipeline

        return pipeline(task, model=self.model, tokenizer=self.tokenizer, **kwargs)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        """transformers' output for `input_ids` (B, T): `.logits` is (B, T, vocab). No key/value cache unless asked
        (`generate` keeps its own): a calibration walk that re-runs a block must not attend to its earlier keys."""
        kwargs.setdefault("use_cache", False)
        return self.model(input_ids=input_ids, **kwargs)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """Sentences as one right-padded batch (calibration on sentences, as for a sentence encoder)."""
        ids = [self.tokenizer.encode(s) for s in sentences]
        width = max((len(i) for i in ids), default=0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], dtype=torch.long)  # (B, T)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], dtype=torch.long)  # (B, T)
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.no_grad()  # not inference_mode: kernels prepared here must stay usable by later autograd-tracked calls
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers' `generate` on the wrapped model (greedy unless the generation config samples)."""
        self.eval()
        if input_ids is not None and "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        return self.model.generate(input_ids=input_ids, **kwargs)

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        """The greedy continuation of `prompt` as text (the prompt itself not repeated)."""
        ids = torch.tensor([self.tokenizer.encode(prompt)], dtype=torch.long)  # (1, T)
        out = self.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def linearise_conv1d(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` (y = x W + b, W (in, out)) by the equal `nn.Linear`; returns how many.

    Works on a meta skeleton (no weight is allocated) as on a loaded model (W transposed once)."""
    from transformers.pytorch_utils import Conv1D

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in convs:
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=conv.bias.requires_grad)
        model.set_submodule(name, linear)
    return len(convs)


def _token(fields: dict, key: str) -> str | None:
    """A special token of tokenizer_config.json: a string, or a serialised AddedToken {"content": ...}."""
    value = fields.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise bad_file("tokenizer_config.json", f"{key} must be a string")
    return value


def causal_lm_tokenizer(files: Mapping[str, bytes]):
    """transformers' fast tokenizer from tokenizer.json, with the special tokens and chat template of the config."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if "tokenizer.json" not in files:
        raise ModelNotFoundError("the model has no tokenizer.json; copy it from the original model (a folder with "
                                 "only vocab.json/merges.txt: save its tokenizer once with transformers)")
    fields = parse_json(files, "tokenizer_config.json") if "tokenizer_config.json" in files else {}
    if not isinstance(fields, dict):
        raise bad_file("tokenizer_config.json", "it must be a JSON object")
    template = fields.get("chat_template")
    if "chat_template.jinja" in files:
        try:
            template = files["chat_template.jinja"].decode("utf-8")
        except UnicodeDecodeError:
            raise bad_file("chat_template.jinja", "it is not UTF-8 text") from None
    if template is not None and not isinstance(template, str):
        template = None  # a list of named templates: not used by modelpress
    specials = {key: _token(fields, key) for key in _SPECIAL_TOKENS}
    try:
        backend = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template,
                                       **{k: v for k, v in specials.items() if v is not None})
    except UnicodeDecodeError:
        raise bad_file("tokenizer.json", "it is not UTF-8 text") from None
    except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
        raise bad_file("tokenizer.json", " ".join(str(exc).split())[:200]) from None


def causal_lm_from_files(files: Mapping[str, bytes], source: Path | None = None, linearise: bool = True) -> CausalLM:
    """The causal LM its support files describe, as a skeleton on the meta device (no weight allocated: a
    tampered config.json may declare any size), tied weights tied and (`linearise`) Conv1D made Linear.
    Fill it with `load_state_dict(state, assign=True)`, `retie`, then `materialise_buffers`."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if "config.json" not in files:
        raise ModelNotFoundError("the model has no config.json: it is not a Hugging Face model")
    fields = parse_json(files, "config.json")
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise bad_file("config.json", "it has no model_type")
    fields = {k: v for k, v in fields.items() if k != "quantization_config"}  # weights here are never a hub format
    try:
        hf_config = AutoConfig.for_model(**fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        if "generation_config.json" in files:
            generation = parse_json(files, "generation_config.json")
            if not isinstance(generation, dict):
                raise bad_file("generation_config.json", "it must be a JSON object")
            model.generation_config = GenerationConfig.from_dict(generation)
    except Exception as exc:  # transformers validates configs with any error type it likes
        if isinstance(exc, ModelpressError):
            raise
        raise bad_file("config.json", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    if linearise:
        linearise_conv1d(model)
    model.eval()
    return CausalLM(model, causal_lm_tokenizer(files), files, source)


def build_causal_lm(folder: Path) -> CausalLM:
    """The float causal LM of a Hugging Face folder (support files and model.safetensors)."""
    weight_file = weights_file(folder)
    lm = causal_lm_from_files(read_support_files(folder, CAUSAL_LM_FILES), source=folder, linearise=False)
    ties = tied_parameters(lm.model)
    fill_causal_lm(lm, source_state(lm.model, weight_file, optional=frozenset(ties) | frozenset(ties.values())),
                   weight_file)
    linearise_conv1d(lm.model)  # after loading: the folder holds Conv1D weights (in, out)
    return lm


def fill_causal_lm(lm: CausalLM, state: dict[str, torch.Tensor], where: Path) -> CausalLM:
    """Give a meta skeleton its weights: `state` checked against it (a tied weight may come under either
    name, once), assigned, tied weights tied again, computed buffers computed."""
    ties = tied_parameters(lm.model)
    state = check_state(lm.model, state, where, optional=frozenset(ties) | frozenset(ties.values()))
    for name, kept in ties.items():  # a source holds a tied weight once, under either name
        if kept not in state and name in state:
            state[kept] = state[name]
        if kept not in state:
            raise FormatError(f"{where}: weights do not match config.json (missing {kept!r}); use the config "
                              "that belongs to these weights")
        state[name] = state[kept]
    lm.model.load_state_dict(state, strict=True, assign=True)
    retie(lm.model, ties)
    materialise_buffers(lm)
    return lm
