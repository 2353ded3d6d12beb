"""Writing a checkpoint folder: all or nothing, and never over anything modelpress did not write.

1. `fileio.check_output_dir` refuses an output that is a symbolic link, lies under a file, in a kernel
   folder or inside a store, is, contains or lies inside a `protected` folder (the source model, a
   store), or exists without `overwrite` (and with it, unless it is a checkpoint modelpress wrote).
2. Every file is written into a fresh hidden sibling `.<name>.<random>.staging` through `fileio`
   (temporary file, fsync, rename, fsync of the folder; a fault point before every write): the
   weights streamed from the tensors' memory in safetensors layout (`tensorfile.serialise`, no
   in-memory copy of the file), the support files, and last the manifest with every file's sha256.
3. The output is checked again and `fileio.swap_in_dir` puts the staging folder in its place
   (an atomic exchange where the system has one), then removes the old folder.

A failure at any step removes the staging folder and leaves the output as it was; a process killed
part way leaves at most a hidden `.staging` sibling, never a half-written folder under the final name.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from modelpress import fileio
from modelpress.formats import tensorfile
from modelpress.formats.manifest import FILES_KEY, MANIFEST, WEIGHTS

__all__ = ["write_checkpoint", "STAGING_SUFFIX"]

STAGING_SUFFIX = ".staging"
_METADATA = {"format": "pt", "writer": "modelpress"}


def _sha256(parts: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _write(folder: Path, rel: str, parts: Sequence[Any]) -> str:
    """Write one file of the staging folder; returns its sha256."""
    target = folder / rel
    if target.parent != folder:
        fileio.make_dirs(target.parent)
    fileio.write_file(target, parts)
    return _sha256(parts)


def write_checkpoint(path: str | Path, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     files: Mapping[str, bytes], overwrite: bool = False,
                     protected: Sequence[str | Path] = ()) -> Path:
    """Write a checkpoint folder at `path` from a manifest (without `files`), its tensors and its support
    files, atomically. Returns the path."""
    out = fileio.check_output_dir(path, overwrite, protected, "checkpoint folder")
    fileio.make_dirs(out.parent)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}{STAGING_SUFFIX}"
    fileio.make_dirs(staging)
    try:
        digests = {WEIGHTS: _write(staging, WEIGHTS, tensorfile.serialise(tensors, _METADATA))}
        for rel, data in files.items():
            digests[rel] = _write(staging, rel, [data])
        text = json.dumps({**manifest, FILES_KEY: digests}, indent=1).encode("utf-8")
        _write(staging, MANIFEST, [text])
        fileio.check_output_dir(path, overwrite, protected, "checkpoint folder")  # nothing appeared meanwhile
        fileio.swap_in_dir(staging, out)
    except BaseException:
        _remove_quietly(staging)
        raise
    return out


def _remove_quietly(folder: Path) -> None:
    """Clean up after a failure without hiding it (the staging folder may already be gone or swapped)."""
    try:
        if folder.is_dir() and not folder.is_symlink():
            fileio.remove_tree(folder)
    except OSError:
        pass
