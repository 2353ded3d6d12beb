"""What every export writes: a folder put in place all at once, and the dense weights of a compressed model.

`write_folder` writes every file into a hidden sibling `.<name>.<random>.staging` through `fileio`
(temporary file, fsync, rename) and swaps it in only when all are written (formats/writer.py's rule),
so a failed export leaves nothing under the output name. Exports never replace an existing folder.

`dense_state` is the model's state dict with every compressed weight decoded: `<module>.weight` from the
module's encoding, and what the encoding was (its `meta()`, and the kernel where it quantises
activations) under the same name, for the export to record.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from modelpress import fileio
from modelpress.encodings import Encoding
from modelpress.nn.kernels import ACTIVATION_KERNELS

__all__ = ["dense_state", "encoding_records", "source_folders", "write_folder"]


def source_folders(model) -> list:
    """The folder a model passed by path was read from, which an export must never replace."""
    return [model] if isinstance(model, (str, Path)) and Path(model).exists() else []


def write_folder(out: str | Path, files: Mapping[str, Sequence[Any]], protected: Sequence[str | Path] = (),
                 what: str = "export folder") -> Path:
    """Write `files` (relative name -> byte parts) as the folder `out`, atomically; refuses an existing `out`."""
    out = fileio.check_output_dir(out, False, protected, what)
    fileio.make_dirs(out.parent)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.staging"
    fileio.make_dirs(staging)
    try:
        for rel, parts in files.items():
            target = staging / rel
            if target.parent != staging:
                fileio.make_dirs(target.parent)
            fileio.write_file(target, parts)
        fileio.check_output_dir(out, False, protected, what)  # nothing appeared meanwhile
        fileio.swap_in_dir(staging, out)
    except BaseException:
        if staging.is_dir() and not staging.is_symlink():
            fileio.remove_tree(staging)
        raise
    return out


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding an encoding (CompressedLinear, CompressedEmbedding, ...), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "encoding", None), Encoding)}


def encoding_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What each compressed weight was: `<module>.weight` -> the encoding's meta (+ the activation kernel)."""
    records = {}
    for name, module in compressed_modules(model).items():
        record = dict(module.encoding.meta())
        kernel = getattr(module, "kernel", None)
        if kernel in ACTIVATION_KERNELS:
            record["activations"] = kernel.value  # quantised per call: a float export does not do this
        records[f"{name}.weight"] = record
    return records


def dense_state(model: nn.Module, dtype: torch.dtype, skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The state dict with every compressed weight decoded (but those of the modules in `skip`, left out);
    floating tensors in `dtype` (others unchanged)."""
    state = {f"{name}.weight": m.encoding.decode(torch.float32).to(dtype)
             for name, m in compressed_modules(model).items() if name not in skip}
    for key, value in model.state_dict().items():
        if key not in state:
            state[key] = value.to(dtype) if value.is_floating_point() else value
    return state
