"""Saving and loading compressed models: safetensors arrays + a JSON manifest, never pickle.

A checkpoint is a folder:

    modelpress.json      manifest: format name and version, architecture, recipe, one entry per
                         compressed module (type, kernel, encoding metadata), sha256 of the weights
    weights.safetensors  every array: plain parameters/buffers under their state_dict names,
                         encoding parts as "<module>.weight::<part>" (e.g. "fc.weight::codes")
    config.json, tokenizer.json, ...   for sentence encoders, the files that rebuild the skeleton

Everything read back is treated as hostile: the manifest is size-capped and checked field by
field against allow-lists, the weights' hash must match, every array's shape and dtype is
checked before it is used, and module names must exist in the skeleton.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from modelpress._version import __version__
from modelpress.encodings import encoding_from_parts
from modelpress.errors import FormatError, ModelNotFoundError, OutputExistsError
from modelpress.formats.entropy import ENTROPY_KEY, entropy_code, entropy_decode
from modelpress.formats.hf import SentenceEncoder, read_support_files, sentence_encoder_from_files
from modelpress.formats.narrow import NARROW_KEY, narrow_floats, widen_floats
from modelpress.nn.provenance import provenance, record_provenance
from modelpress.nn.registry import COMPRESSED_TYPES, check_saveable, module_entry, module_from_entry
from modelpress.nn.shapes import apply_shapes, record_shapes
from modelpress.nn.simplified import apply_simplified, check_simplified, simplified_record

__all__ = ["save", "load", "rebuild", "describe", "read_manifest", "validate_manifest", "MANIFEST", "WEIGHTS", "FORMAT_NAME", "FORMAT_VERSION"]

MANIFEST = "modelpress.json"
WEIGHTS = "weights.safetensors"
FORMAT_NAME = "modelpress.checkpoint"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 2**20
PART_SEPARATOR = "::"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _collect(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest module entries and the flat tensor dict to write."""
    check_saveable(model)  # e.g. layers still in quantisation-aware training
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        entry = module_entry(module)
        if entry is None:
            continue
        modules[name] = entry
        for part, array in module.encoding.arrays().items():
            tensors[f"{name}.weight{PART_SEPARATOR}{part}"] = array
    for key, value in model.state_dict().items():
        tensors[key] = value
    # safetensors refuses tensors that share memory; write independent contiguous copies.
    return modules, {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def save(model: nn.Module, path: str | Path, recipe: Any = None, overwrite: bool = False,
         entropy: bool = True, float_params: str | None = None) -> Path:
    """Write `model` (compressed or not) to the folder `path`, atomically: all or nothing.

    With `entropy` (the default), integer arrays of encodings (codes, cluster indices, bitmasks)
    are entropy-coded where that saves bytes (see `formats/entropy.py`). `float_params`
    ("float16" or "bfloat16") stores the plain float32 parameters narrower (`formats/narrow.py`).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output folder {str(path)!r} already exists: choose another path or pass overwrite")
    manifest, tensors, files = describe(model, recipe)
    if float_params is not None:
        tensors, narrowed = narrow_floats(tensors, {k for k in tensors if PART_SEPARATOR not in k}, float_params)
        manifest = {**manifest, NARROW_KEY: narrowed}
    if entropy:
        tensors, coded = entropy_code(tensors, {k for k in tensors if PART_SEPARATOR in k})
        if coded:
            manifest = {**manifest, ENTROPY_KEY: coded}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt", "writer": "modelpress"})
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        manifest = {**manifest, "weights_file": WEIGHTS, "weights_sha256": _sha256(staging / WEIGHTS)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a saved model is an ordinary folder
        for file in staging.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~umask)
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _bad(path: Path, what: str) -> FormatError:
    return FormatError(f"{path / MANIFEST}: {what}; the checkpoint is corrupt or tampered with, re-save the model")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of a checkpoint folder."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint folder {str(path)!r} does not exist: give the --out folder of `modelpress compress`")
    if not file.is_file():
        raise ModelNotFoundError(f"{str(path)!r} has no {MANIFEST}: it is not a modelpress checkpoint")
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise _bad(path, f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"manifest is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    validate_manifest(manifest, path)
    if manifest.get("weights_file") != WEIGHTS:
        raise _bad(path, f"weights_file must be {WEIGHTS!r}")
    if not isinstance(manifest.get("weights_sha256"), str) or len(manifest["weights_sha256"]) != 64:
        raise _bad(path, "weights_sha256 is missing or malformed")
    return manifest


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check the parts of a manifest every reader relies on (a checkpoint's or a store version's)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _bad(path, "manifest does not name the modelpress checkpoint format")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{path / MANIFEST}: format version {manifest.get('format_version')!r} is not supported (this modelpress "
            f"reads {FORMAT_VERSION}); upgrade modelpress"
        )
    if not isinstance(manifest.get("modules"), dict) or not isinstance(manifest.get("architecture"), dict):
        raise _bad(path, "modules or architecture is missing")
    for name, entry in manifest["modules"].items():
        if not isinstance(entry, dict) or entry.get("type") not in COMPRESSED_TYPES:
            raise _bad(path, f"module {name!r} has an invalid entry")
        if not isinstance(entry.get("weight"), dict):
            raise _bad(path, f"module {name!r} has no weight encoding")
    if "simplified" in manifest:  # BatchNorms folded / Dropouts dropped (nn/simplified.py)
        try:
            check_simplified(manifest["simplified"])
        except FormatError as exc:
            raise _bad(path, str(exc)) from None
    return manifest


def _read_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / WEIGHTS
    if not file.is_file():
        raise ModelNotFoundError(f"{str(path)!r} has no {WEIGHTS}: the checkpoint is incomplete, re-save the model")
    if _sha256(file) != manifest["weights_sha256"]:
        raise FormatError(f"{file}: checksum does not match the manifest; the file is corrupt or was modified, re-save it")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{file}: unreadable safetensors ({exc}); re-save the model") from None
    if ENTROPY_KEY in manifest:
        tensors = entropy_decode(tensors, manifest[ENTROPY_KEY], file)
    if NARROW_KEY in manifest:
        tensors = widen_floats(tensors, manifest[NARROW_KEY], file)
    return tensors


def _build_skeleton(path: Path, manifest: dict[str, Any], files: Mapping[str, bytes],
                    model: nn.Module | None) -> nn.Module:
    kind = manifest["architecture"].get("kind")
    if model is not None:
        return model
    if kind == "sentence-transformers":
        return sentence_encoder_from_files(files)
    raise FormatError(
        f"{path}: the checkpoint holds a plain {manifest['architecture'].get('class', 'nn.Module')}; "
        "pass the uncompressed model as `load(path, model=...)` so its structure can be rebuilt"
    )


def _compressed_module(name: str, entry: dict[str, Any], parts: dict[str, torch.Tensor], current: nn.Module, path: Path):
    try:
        enc = encoding_from_parts(entry["weight"], parts)
    except FormatError as exc:
        raise FormatError(f"{path}: module {name!r}: {exc}") from None
    try:
        return module_from_entry(name, entry, enc, current)
    except FormatError as exc:
        raise _bad(path, str(exc)) from None


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model; `model` is the uncompressed skeleton for checkpoints of plain modules."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors = _read_weights(path, manifest)
    return rebuild(manifest, tensors, read_support_files(path), path, model)


def rebuild(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], files: Mapping[str, bytes], path: Path,
            model: nn.Module | None = None) -> nn.Module:
    """A runnable model from a validated manifest, its arrays and its support files (config.json,
    tokenizer.json, ... as bytes): a checkpoint's or a store version's. `path` names the source in
    error messages.
    """
    skeleton = _build_skeleton(path, manifest, files, model)
    if "simplified" in manifest:  # a simplified model: BatchNorms/Dropouts to Identity, folded biases added
        try:
            apply_simplified(skeleton, manifest["simplified"])
        except FormatError as exc:
            raise _bad(path, str(exc)) from None
    if "shapes" in manifest:  # structurally pruned layers: shrink the skeleton's before filling it
        try:
            apply_shapes(skeleton, manifest["shapes"])
        except FormatError as exc:
            raise _bad(path, str(exc)) from None
    known = dict(skeleton.named_modules())
    used: set[str] = set()
    for name, entry in manifest["modules"].items():
        if name not in known or not name:
            raise _bad(path, f"module {name!r} does not exist in the model")
        prefix = f"{name}.weight{PART_SEPARATOR}"
        parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + p for p in parts)
        skeleton.set_submodule(name, _compressed_module(name, entry, parts, known[name], path))
    state = {k: v for k, v in tensors.items() if k not in used}
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise _bad(path, f"tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in state.items():
        if value.shape != expected[key].shape or value.dtype != expected[key].dtype:
            raise _bad(path, f"tensor {key!r} is {tuple(value.shape)} {value.dtype}, expected "
                             f"{tuple(expected[key].shape)} {expected[key].dtype}")
    skeleton.load_state_dict(state, strict=True)
    skeleton.eval()
    recipe = manifest.get("recipe")
    if recipe is not None and not isinstance(recipe, dict):
        raise _bad(path, "recipe must be a mapping (the recipe as plain data) or null")
    if recipe is not None:
        record_provenance(skeleton, recipe)  # kept as plain data: Recipe.from_dict(provenance(model).recipe)
    return skeleton


def describe(model: nn.Module, recipe: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, bytes]]:
    """What saving `model` writes: the manifest (without file checksums), its arrays, and its support
    files (relative name -> bytes)."""
    recipe = recipe if recipe is not None else provenance(model).recipe
    modules, tensors = _collect(model)
    architecture: dict[str, Any] = {"kind": "module", "class": type(model).__name__}
    files: dict[str, bytes] = {}
    if isinstance(model, SentenceEncoder):
        architecture = {"kind": "sentence-transformers"}
        files = dict(model.support_files)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "modelpress_version": __version__,
        "architecture": architecture,
        "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
        "modules": modules,
        "shapes": record_shapes(model),  # layer widths, so that structurally pruned models rebuild
    }
    simplified = simplified_record(model)  # set by passes/simplify.py
    if simplified:
        manifest["simplified"] = {key: list(names) for key, names in simplified.items()}
    return manifest, tensors, files
