"""Saving and loading compressed models: safetensors arrays + a JSON manifest, never pickle.

A checkpoint is a folder:

    modelpress.json      manifest: format name and version, architecture, recipe, one entry per
                         compressed module (type, kernel, encoding metadata), the sha256 of every
                         other file (formats/manifest.py)
    weights.safetensors  every array: plain parameters/buffers under their state_dict names,
                         encoding parts as "<module>.weight::<part>" (e.g. "fc.weight::codes")
    config.json, tokenizer.json, ...   for sentence encoders and causal LMs, the files that rebuild the skeleton

This module turns a model into (manifest, tensors, support files) and back: `describe` and `rebuild`
(the store uses both). Folders are written by formats/writer.py (atomically, never over what
modelpress did not write) and read by formats/reader.py (every file hashed and bounded).

Everything read back is treated as hostile: the manifest is size-, depth- and number-capped and
checked field by field against allow-lists, every file's hash must match, every array's shape and
dtype is checked against a skeleton built on the meta device before any weight is allocated, stored
scales, zero points and biases must be finite, and module names must exist in the skeleton.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from modelpress import fileio
from modelpress._version import __version__
from modelpress.encodings import encoding_from_parts
from modelpress.errors import ConfigError, FormatError, UnsupportedError
from modelpress.formats.causal_lm import CausalLM, causal_lm_from_files
from modelpress.formats.entropy import ENTROPY_KEY, entropy_code
from modelpress.formats.hf import SentenceEncoder, materialise_buffers, sentence_encoder_from_files
from modelpress.formats.manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, WEIGHTS, bad_manifest, read_manifest,
                                         validate_manifest)
from modelpress.formats.narrow import NARROW_KEY, narrow_floats
from modelpress.formats.reader import read_checkpoint
from modelpress.formats.writer import write_checkpoint
from modelpress.nn.provenance import provenance, record_provenance
from modelpress.nn.registry import check_saveable, module_entry, module_from_entry
from modelpress.nn.shapes import apply_shapes, record_shapes
from modelpress.nn.simplified import apply_simplified, simplified_record
from modelpress.nn.tying import retie, tied_parameters

__all__ = ["save", "load", "rebuild", "describe", "read_manifest", "validate_manifest", "MANIFEST", "WEIGHTS",
           "FORMAT_NAME", "FORMAT_VERSION"]

PART_SEPARATOR = "::"
_bad = bad_manifest


def _collect(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Manifest module entries, the flat tensor dict to write, and the tied parameters left out of it.

    A tied weight is written once: a compressed module sharing an earlier module's encoding gets a
    `tied_to` entry and no arrays; a parameter that is the same object as an earlier one is listed in
    `tied` (name -> the stored name) instead of written."""
    check_saveable(model)  # e.g. layers still in quantisation-aware training
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[int, str] = {}  # id(encoding) -> the module that stores it
    for name, module in model.named_modules():
        entry = module_entry(module)
        if entry is None:
            continue
        owner = owners.setdefault(id(module.encoding), name)
        if owner != name:
            modules[name] = {**entry, "tied_to": owner}
            continue
        modules[name] = entry
        for part, array in module.encoding.arrays().items():
            tensors[f"{name}.weight{PART_SEPARATOR}{part}"] = array
    tied = tied_parameters(model)
    for key, value in model.state_dict().items():
        if key not in tied:
            tensors[key] = value
    # The writer streams each tensor's own memory (tensorfile.serialise): no copy of the model is made.
    return modules, {k: v.detach().contiguous() for k, v in tensors.items()}, tied


def save(model: nn.Module, path: str | Path, recipe: Any = None, overwrite: bool = False,
         entropy: bool = True, float_params: str | None = None, protected: Sequence[str | Path] = ()) -> Path:
    """Write `model` (compressed or not) to the folder `path`, atomically: all or nothing.

    `overwrite` replaces an existing checkpoint, never a folder that is, contains or lies inside a
    `protected` path (the model's own `source` folder is always protected) or a store, nor a folder
    modelpress did not write (see formats/writer.py). With `entropy` (the default), integer arrays of
    encodings (codes, cluster indices, bitmasks) are entropy-coded where that saves bytes (see
    `formats/entropy.py`). `float_params` ("float16" or "bfloat16") stores the plain float32
    parameters narrower (`formats/narrow.py`).
    """
    source = getattr(model, "source", None)
    protected = [*protected, *([source] if source is not None else [])]
    fileio.check_output_dir(path, overwrite, protected, "checkpoint folder")  # before any work
    manifest, tensors, files = describe(model, recipe)
    if float_params is not None:
        tensors, narrowed = narrow_floats(tensors, {k for k in tensors if PART_SEPARATOR not in k}, float_params)
        manifest = {**manifest, NARROW_KEY: narrowed}
    if entropy:
        tensors, coded = entropy_code(tensors, {k for k in tensors if PART_SEPARATOR in k})
        if coded:
            manifest = {**manifest, ENTROPY_KEY: coded}
    return write_checkpoint(path, manifest, tensors, files, overwrite, protected)


def _build_skeleton(path: Path, manifest: dict[str, Any], files: Mapping[str, bytes],
                    model: nn.Module | None) -> nn.Module:
    kind = manifest["architecture"].get("kind")
    if model is not None:
        return model
    if kind == "sentence-transformers":
        return sentence_encoder_from_files(files)
    if kind == "causal-lm":
        return causal_lm_from_files(files)
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


def _tied_module(name: str, entry: dict[str, Any], encoding, current: nn.Module, path: Path) -> nn.Module:
    """The module of a `tied_to` entry: its own type and fields, the shared encoding object."""
    try:
        return module_from_entry(name, entry, encoding, current)
    except FormatError as exc:
        raise _bad(path, str(exc)) from None


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model; `model` is the uncompressed skeleton for checkpoints of plain modules."""
    path = Path(path)
    manifest, tensors, files = read_checkpoint(path)
    return rebuild(manifest, tensors, files, path, model)


def rebuild(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], files: Mapping[str, bytes], path: Path,
            model: nn.Module | None = None) -> nn.Module:
    """A runnable model from a validated manifest, its arrays and its support files (config.json,
    tokenizer.json, ... as bytes): a checkpoint's or a store version's. `path` names the source in
    error messages.

    A sentence encoder's skeleton is built on the meta device, checked tensor by tensor against
    `tensors`, and only then given them (`load_state_dict(assign=True)`: no weight is allocated twice).
    """
    check_finite(tensors, path)
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
    built: dict[str, nn.Module] = {}
    entries = manifest["modules"]
    for name in sorted(entries, key=lambda n: "tied_to" in entries[n]):  # tied modules after what they share
        entry = entries[name]
        if name not in known or not name:
            raise _bad(path, f"module {name!r} does not exist in the model")
        if "tied_to" in entry:  # validate_manifest: the target holds the same encoding metadata
            built[name] = _tied_module(name, entry, built[entry["tied_to"]].encoding, known[name], path)
        else:
            prefix = f"{name}.weight{PART_SEPARATOR}"
            parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            used.update(prefix + p for p in parts)
            built[name] = _compressed_module(name, entry, parts, known[name], path)
    for name, module in built.items():
        skeleton.set_submodule(name, module)
    state = {k: v for k, v in tensors.items() if k not in used}
    expected = skeleton.state_dict()
    ties = manifest.get("tied", {})
    for name, kept in ties.items():  # stored once: both names get the stored tensor, then share one Parameter
        if name in state or kept not in state or name not in expected:
            raise _bad(path, f"tied weight {name!r} -> {kept!r} does not name a stored weight of the model")
        state[name] = state[kept]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise _bad(path, f"tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in state.items():
        if value.shape != expected[key].shape or value.dtype != expected[key].dtype:
            raise _bad(path, f"tensor {key!r} is {tuple(value.shape)} {value.dtype}, expected "
                             f"{tuple(expected[key].shape)} {expected[key].dtype}")
    skeleton.load_state_dict(state, strict=True, assign=True)
    try:
        retie(skeleton, ties)
    except FormatError as exc:
        raise _bad(path, str(exc)) from None
    _materialise(skeleton, path)
    skeleton.eval()
    recipe = manifest.get("recipe")
    if recipe is not None and not isinstance(recipe, dict):
        raise _bad(path, "recipe must be a mapping (the recipe as plain data) or null")
    if recipe is not None:
        record_provenance(skeleton, recipe)  # kept as plain data: Recipe.from_dict(provenance(model).recipe)
    return skeleton


def check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinity in what no valid model holds them: the float parts of encodings (scales,
    zero points, codebooks, factors) and biases."""
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() and (PART_SEPARATOR in name or name.endswith("bias"))
                and not bool(torch.isfinite(tensor).all())):
            raise FormatError(f"{path}: tensor {name!r} holds NaN or infinity; the file is corrupt, re-save the model")


def _materialise(skeleton: nn.Module, path: Path) -> None:
    """Give real values to what the state dict does not hold (a meta skeleton's non-persistent buffers)."""
    if isinstance(skeleton, (SentenceEncoder, CausalLM)):
        materialise_buffers(skeleton)
    left = [name for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers()) if t.is_meta]
    if left:
        raise UnsupportedError(f"{path}: the model's tensors {left[:3]} are neither stored nor computed when it is "
                               "built; pass the uncompressed model as `load(path, model=...)`")


def describe(model: nn.Module, recipe: Any = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, bytes]]:
    """What saving `model` writes: the manifest (without file checksums), its arrays, and its support
    files (relative name -> bytes)."""
    recipe = recipe if recipe is not None else provenance(model).recipe
    modules, tensors, tied = _collect(model)
    architecture: dict[str, Any] = {"kind": "module", "class": type(model).__name__}
    files: dict[str, bytes] = {}
    if isinstance(model, SentenceEncoder):
        architecture = {"kind": "sentence-transformers"}
        files = dict(model.support_files)
    if isinstance(model, CausalLM):
        architecture = {"kind": "causal-lm", "class": type(model.model).__name__}
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
    if tied:
        manifest["tied"] = tied
    simplified = simplified_record(model)  # set by passes/simplify.py
    if simplified:
        manifest["simplified"] = {key: list(names) for key, names in simplified.items()}
    return manifest, tensors, files
