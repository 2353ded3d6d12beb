"""The checkpoint manifest (`modelpress.json`): what it may say, checked field by field.

    {"format": "modelpress.checkpoint", "format_version": 1, "modelpress_version": "...",
     "architecture": {"kind": "sentence-transformers" | "causal-lm"} | {"kind": "module", "class": "..."},
     "recipe": {...} | null,                      provenance only
     "modules": {"<name>": {"type": "linear" | "embedding" | "conv2d", "weight": {"kind": ...}, ...}},
     "shapes": {...}, "simplified": {...},          optional: structural changes to rebuild
     "tied": {"lm_head.weight": "model.embed_tokens.weight"},   optional: parameters stored once
                                                  (a module entry's "tied_to" does the same for encodings)
     "entropy_coded": {...}, "narrowed_floats": {...},   optional: how arrays are stored (entropy.py, narrow.py)
     "files": {"weights.safetensors": "<sha256>", "tokenizer.json": "<sha256>", ...}}

`validate_manifest` checks what every reader of a model description relies on (a checkpoint's or a
store version's). `read_manifest` reads a checkpoint's manifest (a regular file, size, depth and
number caps: modelpress.safeparse) and also checks its `files`: every file a load uses, by an
allow-listed name (never a path), with its sha256.

Checkpoints written before file hashes existed (a `weights_sha256` and no `files`) are refused with a
"re-save" error: their tokenizer.json and config.json were never hashed, so nothing vouches for them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from modelpress import fileio
from modelpress.errors import FormatError, ModelNotFoundError
from modelpress.formats.causal_lm import CAUSAL_LM_FILES
from modelpress.formats.hf import SUPPORT_FILES
from modelpress.limits import MAX_JSON_BYTES
from modelpress.nn.registry import COMPRESSED_TYPES
from modelpress.nn.simplified import check_simplified
from modelpress.safeparse import load_json

__all__ = ["MANIFEST", "WEIGHTS", "FILES_KEY", "FORMAT_NAME", "FORMAT_VERSION", "MAX_MANIFEST_BYTES", "bad_manifest",
           "read_manifest", "validate_manifest"]

MANIFEST = "modelpress.json"
WEIGHTS = "weights.safetensors"
FILES_KEY = "files"
FORMAT_NAME = "modelpress.checkpoint"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = MAX_JSON_BYTES
CHECKPOINT_FILES = tuple(dict.fromkeys((WEIGHTS, *SUPPORT_FILES, *CAUSAL_LM_FILES)))  # every name `files` may list
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_DIMS, MAX_DIM = 8, 1 << 40  # an encoded weight's rank and size along one dimension


def bad_manifest(path: Path, what: str) -> FormatError:
    return FormatError(f"{path / MANIFEST}: {what}; the checkpoint is corrupt or tampered with, re-save the model")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of a checkpoint folder, with its `files` checked."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ModelNotFoundError(f"checkpoint {str(path)!r} is a file, not a folder: give the --out folder of "
                                 "`modelpress compress`")
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint folder {str(path)!r} does not exist: give the --out folder of "
                                 "`modelpress compress`")
    try:
        data = fileio.read_file(path / MANIFEST, MAX_MANIFEST_BYTES, "checkpoint manifest")
    except FileNotFoundError:
        raise ModelNotFoundError(f"{str(path)!r} has no {MANIFEST}: it is not a modelpress checkpoint (load a Hugging "
                                 "Face or GPTQ folder or a .gguf file with modelpress.load_model)") from None
    manifest = load_json(data, f"{path / MANIFEST}", hint="the checkpoint is corrupt, re-save the model")
    validate_manifest(manifest, path)
    check_files(manifest, path)
    return manifest


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check the parts of a manifest every reader relies on (a checkpoint's or a store version's)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise bad_manifest(path, "manifest does not name the modelpress checkpoint format")
    if manifest.get("format_version") != FORMAT_VERSION or isinstance(manifest.get("format_version"), bool):
        raise FormatError(
            f"{path / MANIFEST}: format version {manifest.get('format_version')!r} is not supported (this modelpress "
            f"reads {FORMAT_VERSION}); upgrade modelpress"
        )
    if not isinstance(manifest.get("modules"), dict) or not isinstance(manifest.get("architecture"), dict):
        raise bad_manifest(path, "modules or architecture is missing")
    if not isinstance(manifest["architecture"].get("kind"), str):
        raise bad_manifest(path, "architecture has no kind")
    for name, entry in manifest["modules"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or entry["type"] not in COMPRESSED_TYPES:
            raise bad_manifest(path, f"module {name!r} has an invalid entry")
        if not isinstance(entry.get("weight"), dict):
            raise bad_manifest(path, f"module {name!r} has no weight encoding")
        _check_shapes(entry["weight"], path, name)
    _check_ties(manifest, path)
    if manifest.get("recipe") is not None and not isinstance(manifest["recipe"], dict):
        raise bad_manifest(path, "recipe must be a mapping or null")
    if "simplified" in manifest:  # BatchNorms folded / Dropouts dropped (nn/simplified.py)
        try:
            check_simplified(manifest["simplified"])
        except FormatError as exc:
            raise bad_manifest(path, str(exc)) from None
    return manifest


def _check_ties(manifest: dict[str, Any], path: Path) -> None:
    """`tied` maps a parameter to the one it shares (stored once); a module's `tied_to` names the module whose
    encoding it shares, which holds the arrays itself and has the same encoding metadata."""
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) and v not in tied
                                             for k, v in tied.items()):
        raise bad_manifest(path, "tied must map parameter names to the names of stored parameters")
    modules = manifest["modules"]
    for name, entry in modules.items():
        if "tied_to" not in entry:
            continue
        target = modules.get(entry["tied_to"]) if isinstance(entry["tied_to"], str) else None
        if target is None or "tied_to" in target or target["weight"] != entry["weight"]:
            raise bad_manifest(path, f"module {name!r} is tied to {entry['tied_to']!r}, which is not a module "
                                     "holding the same encoded weight")


def _check_shapes(meta: dict[str, Any], path: Path, name: str) -> None:
    """Every `shape` in an encoding's metadata (nested ones too) is 1 to 8 positive sizes: a zero-size
    dimension has no valid weight and makes the per-group arithmetic divide by zero."""
    stack: list[Any] = [meta]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            shape = node.get("shape")
            if "shape" in node and (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM for d in shape)):
                raise bad_manifest(path, f"module {name!r} has a weight shape {shape!r}; sizes must be 1 to "
                                         f"{MAX_DIMS} integers in [1, {MAX_DIM}]")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_files(manifest: dict[str, Any], path: Path) -> dict[str, str]:
    """A checkpoint's `files`: allow-listed names, each with a sha256, the weights among them."""
    files = manifest.get(FILES_KEY)
    if files is None and "weights_sha256" in manifest:
        raise FormatError(f"{path}: the checkpoint was written by an older modelpress that did not hash its "
                          "tokenizer and config files, so they cannot be verified; compress the model again to "
                          "write a current checkpoint")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise bad_manifest(path, f"'{FILES_KEY}' must list {WEIGHTS} and every other file with its sha256")
    for rel, digest in files.items():
        if rel not in CHECKPOINT_FILES:
            raise bad_manifest(path, f"file {rel!r} is not one a checkpoint holds ({list(CHECKPOINT_FILES)})")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad_manifest(path, f"file {rel!r} has no valid sha256")
    return files
