"""A causal LM's tokenizer as GGUF `tokenizer.*` metadata (what llama.cpp's vocabulary loader reads).

Byte-level BPE tokenizers (GPT-2 style; SmolLM2's, and the one a model read from a GGUF file carries:
transformers rebuilds tokenizer.json from the file's vocabulary) become `tokenizer.ggml.model = gpt2`:
the tokens by id, the merges as "a b" strings, a type per token (1 normal, 3 control for special added
tokens, 4 user defined for other added tokens, 5 unused for ids past the tokenizer's vocabulary that the
model's embedding still has), bos/eos/unk/padding ids, whether a BOS token is added, and the chat template.

`tokenizer.ggml.pre` names the pre-tokenizer llama.cpp must run (its splitting regex). It is read off
tokenizer.json's pre_tokenizer (unless the model was read from a GGUF file, whose name is carried in its
config as `gguf_tokenizer_pre`): byte-level alone is "gpt-2"; individual digits split first, then
byte-level, is "smollm" (llama.cpp's \\p{N} + GPT-2 regex, as for StarCoder and SmolLM). Another
pre-tokenizer is refused unless the caller names llama.cpp's pre-tokenizer for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modelpress.errors import UnsupportedError

__all__ = ["tokenizer_metadata"]

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_ROLES = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
          "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def _pre_name(pre: Any) -> str | None:
    if not isinstance(pre, dict):
        return None
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence" and isinstance(pre.get("pretokenizers"), list):
        steps = pre["pretokenizers"]
        if len(steps) == 2 and all(isinstance(s, dict) for s in steps) and steps[0].get("type") == "Digits" \
                and steps[0].get("individual_digits") and steps[1].get("type") == "ByteLevel" \
                and steps[1].get("use_regex", True):
            return "smollm"
    return None


def _adds_bos(tok: dict[str, Any], bos: str | None) -> bool:
    post = tok.get("post_processor")
    if not isinstance(post, dict) or bos is None:
        return False
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    if isinstance(single, list) and single:
        first = single[0]
        return isinstance(first, dict) and (first.get("SpecialToken") or {}).get("id") == bos
    return False


def tokenizer_metadata(files: Mapping[str, bytes], vocab_size: int, pre: str | None = None) -> dict[str, Any]:
    """{GGUF key: value} for the tokenizer in a CausalLM's support files; `pre` overrides the pre-tokenizer name."""
    if "tokenizer.json" not in files:
        raise UnsupportedError("the model carries no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    tok = json.loads(files["tokenizer.json"])
    model = tok.get("model") or {}
    decoder = tok.get("decoder") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or decoder.get("type") != "ByteLevel":
        raise UnsupportedError("GGUF export writes byte-level BPE tokenizers (GPT-2 style) only; this model's is "
                               f"{model.get('type')!r} with a {decoder.get('type')!r} decoder: export it with "
                               "--format hf instead")
    pre = pre or _pre_name(tok.get("pre_tokenizer"))
    if pre is None:
        raise UnsupportedError("this tokenizer's pre-tokenizer is not one the GGUF export recognises; name "
                               "llama.cpp's for it (tokenizer_pre='llama-bpe', 'qwen2', ...)")
    by_id: dict[int, tuple[str, int]] = {int(i): (t, NORMAL) for t, i in model["vocab"].items()}
    for added in tok.get("added_tokens") or []:
        by_id[int(added["id"])] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    size = max(vocab_size, max(by_id, default=-1) + 1)
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {t: i for i, (t, _) in enumerate(tokens)}
    fields = json.loads(files.get("tokenizer_config.json", b"{}"))
    fields = {k: v.get("content") if isinstance(v, dict) else v for k, v in fields.items()}  # AddedToken dicts
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [t for t, _ in tokens], "tokenizer.ggml.token_type": [k for _, k in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": _adds_bos(tok, fields.get("bos_token")),
        "tokenizer.ggml.add_space_prefix": False,
    }
    if not merges:  # transformers' GGUF reader takes an empty merge list as none and rebuilds merges from scores
        out["tokenizer.ggml.scores"] = [0.0] * len(tokens)
    for role, key in _ROLES.items():
        name = fields.get(role)
        if isinstance(name, str) and name in ids:
            out[key] = ids[name]
    if "chat_template.jinja" in files:
        out["tokenizer.chat_template"] = files["chat_template.jinja"].decode()
    return out
