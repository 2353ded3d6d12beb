"""Output folders (`--out`): replaced only when that cannot destroy anything modelpress did not write
(`check_output_dir`); a replacement is written beside the old folder and swapped in (`swap_in_dir`)."""

from __future__ import annotations

import ctypes
import errno
import os
import uuid
from pathlib import Path
from typing import Sequence

from modelpress._libc import libc
from modelpress.errors import ModelpressError, OutputExistsError, UnsafeOutputError
from modelpress.fileio.faults import fault_point
from modelpress.fileio.writing import fsync_dir, io_error, remove_tree

__all__ = ["STORE_MARKER", "CHECKPOINT_MARKER", "check_output_dir", "swap_in_dir"]

STORE_MARKER = "STORE"  # the file that makes a folder a modelpress store (store/store.py writes it)
CHECKPOINT_MARKER = "modelpress.json"  # the manifest that makes a folder a modelpress checkpoint

_SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")  # kernel file systems: writing there is never a model folder


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _store_above(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / STORE_MARKER).is_file():
            return folder
    return None


def check_output_dir(out: str | os.PathLike, overwrite: bool, protected: Sequence[str | os.PathLike] = (),
                     what: str = "output folder") -> Path:
    """Refuse an output folder that writing (or replacing) could use to destroy data; returns it as a Path.

    Refused: a symbolic link; a path under a file, inside a store or in /proc, /sys or /dev; a folder that is, contains or lies
    inside any `protected` path (the source model, a store); an existing folder unless `overwrite` is
    given, and even then unless it is empty or a modelpress checkpoint (holds `modelpress.json`) with
    no store inside. So `--overwrite` only ever replaces what modelpress wrote.
    """
    out = Path(out)
    if out.is_symlink():
        raise UnsafeOutputError(f"{what} {str(out)!r} is a symbolic link: give the real folder")
    real = _real(out)
    for system in _SYSTEM_FOLDERS:
        if _inside(real, Path(system)):
            raise UnsafeOutputError(f"{what} {str(out)!r} lies in {system}, a system folder of the kernel, not a "
                                    "disk: choose a folder on a disk")
    for folder in real.parents:
        if folder.exists() and not folder.is_dir():
            raise UnsafeOutputError(f"{what} {str(out)!r} lies under {str(folder)!r}, which is a file: choose another path")
    store = _store_above(real)
    if store is not None:
        raise UnsafeOutputError(f"{what} {str(out)!r} lies inside the modelpress store {str(store)!r}: "
                                "write outside the store")
    for item in protected:
        guarded = _real(Path(item))
        if _inside(real, guarded) or _inside(guarded, real):
            raise UnsafeOutputError(f"{what} {str(out)!r} is, contains or lies inside {str(item)!r}, which this "
                                    "command reads: choose another folder")
    if not out.exists():
        return out
    if not overwrite:
        raise OutputExistsError(f"{what} {str(out)!r} already exists: choose another path or add --overwrite")
    if not out.is_dir():
        raise UnsafeOutputError(f"{what} {str(out)!r} is a file, not a folder: choose another path")
    entries = list(out.iterdir())
    if entries and not (out / CHECKPOINT_MARKER).is_file():
        raise UnsafeOutputError(f"{what} {str(out)!r} exists and is not a modelpress output (no {CHECKPOINT_MARKER}); "
                                "--overwrite only replaces a folder modelpress wrote: choose another path")
    for sub in out.rglob(STORE_MARKER):
        raise UnsafeOutputError(f"{what} {str(out)!r} holds a modelpress store ({str(sub.parent)!r}); "
                                "refusing to replace it")
    return out


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    fn = getattr(libc(), "renameat2", None) if libc() is not None else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return False  # the kernel or file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err))


def swap_in_dir(staging: Path, out: Path) -> None:
    """Put the fully written, fsynced folder `staging` (a sibling of `out`) in place of `out`.

    When `out` exists the two are exchanged atomically where the system can, else `out` is first
    renamed aside; the old folder is removed only once the new one is in place (if that removal fails,
    the old folder stays as a hidden sibling and no error is raised: the replacement succeeded).
    """
    try:
        if not out.exists():
            fault_point("rename", out)
            os.rename(staging, out)
            fsync_dir(out.parent)
            return
        fault_point("rename", out)
        if _exchange(staging, out):
            old = staging
        else:
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                fault_point("rename", out)
                os.rename(staging, out)
            except BaseException:
                os.rename(old, out)  # put the old folder back: a failed replace changes nothing
                raise
        fsync_dir(out.parent)
    except OSError as exc:
        if isinstance(exc, ModelpressError):
            raise
        raise io_error("replacing", out, exc) from None
    try:
        remove_tree(old)
    except OSError:
        pass  # the new folder is in place: a failed clean-up leaves the old one as a hidden sibling, no worse
