"""Reading a checkpoint folder: every file it uses, verified, before anything is built from it.

Each file the manifest lists is read through `fileio` (a regular file, never a link, FIFO or device;
bounded: support files by MAX_SUPPORT_FILE_BYTES, the weights by the memory available) and must hash
to its sha256 in the manifest. Files the manifest does not list are never read. The weights are parsed
by `tensorfile.parse` (an audited header; tensors are views of the one buffer read), then entropy-coded
arrays are decoded and narrowed floats widened, each checked against its manifest entry first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from modelpress import fileio
from modelpress.errors import IntegrityError, ModelNotFoundError, NotRegularFileError
from modelpress.formats import tensorfile
from modelpress.formats.entropy import ENTROPY_KEY, entropy_decode
from modelpress.formats.hf import MAX_WEIGHTS_BYTES
from modelpress.formats.manifest import FILES_KEY, WEIGHTS, read_manifest
from modelpress.formats.narrow import NARROW_KEY, widen_floats
from modelpress.limits import MAX_SUPPORT_FILE_BYTES

__all__ = ["read_checkpoint", "read_checked_file"]


def read_checked_file(folder: Path, rel: str, sha256: str) -> bytearray:
    """The bytes of `folder/rel`, which must be a regular file hashing to `sha256`."""
    file = folder / rel
    if file.parent != folder and file.parent.is_symlink():
        raise NotRegularFileError(f"{file.parent} is a symbolic link; a checkpoint holds only regular files and "
                                  "folders: re-save the model")
    limit = MAX_WEIGHTS_BYTES if rel == WEIGHTS else MAX_SUPPORT_FILE_BYTES
    try:
        data = fileio.read_buffer(file, limit, f"checkpoint file {rel}")
    except FileNotFoundError:
        raise ModelNotFoundError(f"{str(folder)!r} has no {rel}: the checkpoint is incomplete, re-save the model") from None
    except NotADirectoryError:
        raise NotRegularFileError(f"{file.parent} is not a folder: the checkpoint is damaged, re-save the model") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"{file}: checksum does not match the manifest; the file is corrupt or was modified, "
                             "re-save the model")
    return data


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, bytes]]:
    """A checkpoint's manifest, its tensors (decoded, widened) and its support files, all verified."""
    path = Path(path)
    manifest = read_manifest(path)
    listed = manifest[FILES_KEY]
    weights = read_checked_file(path, WEIGHTS, listed[WEIGHTS])
    files = {rel: bytes(read_checked_file(path, rel, digest)) for rel, digest in listed.items() if rel != WEIGHTS}
    tensors = tensorfile.parse(weights, str(path / WEIGHTS))
    if ENTROPY_KEY in manifest:
        tensors = entropy_decode(tensors, manifest[ENTROPY_KEY], path / WEIGHTS)
    if NARROW_KEY in manifest:
        tensors = widen_floats(tensors, manifest[NARROW_KEY], path / WEIGHTS)
    return manifest, tensors, files
