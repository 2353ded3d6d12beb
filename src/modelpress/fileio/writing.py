"""Atomic writes: a temporary sibling is written in full, fsynced, renamed (or hard-linked, when an
existing file must win) into place, and its folder fsynced. A failed fsync is never retried: after one,
the kernel may already have dropped the unwritten pages (PostgreSQL's fsync lesson), so the operation
fails, its temporary is removed, and nothing visible has changed. Also folder creation and removal
that never follow a link, and the lock file writers share."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from modelpress.errors import ModelpressError, NotRegularFileError, StorageIOError, UnsafeOutputError
from modelpress.fileio.faults import fault_point

__all__ = ["io_error", "write_temp", "publish", "write_file", "fsync_dir", "make_dirs", "remove_file", "remove_tree", "locked"]

def io_error(action: str, path: str | os.PathLike, exc: OSError) -> StorageIOError:
    return StorageIOError(f"{action} {os.fspath(path)!r} failed ({exc.strerror or exc}); nothing already "
                          "written was changed: free space or fix the disk, then run the command again")


def write_temp(folder: str | os.PathLike, stem: str, parts: Sequence[bytes | memoryview], mode: int = 0o644) -> Path:
    """Write `parts` to a new temporary file in `folder` and fsync it; returns its path.

    On any failure the temporary is removed and StorageIOError raised (a failed fsync is not retried).
    """
    tmp = Path(folder) / f".{stem}.{uuid.uuid4().hex}.part"
    try:
        fault_point("write", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        raise io_error("creating", tmp, exc) from None
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            fault_point("write", tmp, fd, view)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        fault_point("fsync", tmp, fd)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(tmp)
        raise io_error("writing", tmp, exc) from None
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def publish(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Move a written temporary to `final` and fsync the folder.

    replace=True renames over any existing file; replace=False links, so an existing `final` wins
    (returns False and removes the temporary). Either way a reader sees the old file or the whole new one.
    """
    try:
        if replace:
            fault_point("rename", final)
            os.replace(tmp, final)
        else:
            fault_point("link", final)
            try:
                os.link(tmp, final)
            except FileExistsError:
                _unlink_quietly(tmp)
                return False
            _unlink_quietly(tmp)
        fsync_dir(final.parent)
    except OSError as exc:
        if isinstance(exc, ModelpressError):
            raise
        _unlink_quietly(tmp)
        raise io_error("publishing", final, exc) from None
    return True


def write_file(path: str | os.PathLike, data: bytes | memoryview | Sequence[bytes | memoryview],
               replace: bool = True, mode: int = 0o644) -> bool:
    """Atomically write a whole file (see `write_temp` and `publish`); False when replace=False and
    `path` already existed."""
    path = Path(path)
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return publish(write_temp(path.parent, path.name, parts, mode), path, replace)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable; StorageIOError if the system cannot (not retried)."""
    try:
        fault_point("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if isinstance(exc, ModelpressError):
            raise
        raise io_error("syncing folder", path, exc) from None


def make_dirs(path: str | os.PathLike) -> None:
    """mkdir -p, refusing a path whose existing part is a symlink or a file."""
    path = Path(path)
    try:
        fault_point("mkdir", path)
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UnsafeOutputError(f"{str(path)!r} (or a folder above it) exists and is not a folder: "
                                "choose another path") from None
    except NotADirectoryError:
        raise UnsafeOutputError(f"{str(path)!r} lies under a file, not a folder: choose another path") from None
    except OSError as exc:
        raise io_error("creating folder", path, exc) from None
    if path.is_symlink():
        raise UnsafeOutputError(f"{str(path)!r} is a symbolic link: give the real folder")


def remove_file(path: str | os.PathLike) -> None:
    """Unlink a file (or a link itself). FileNotFoundError (the builtin) if there is none; StorageIOError if the
    system refuses."""
    try:
        fault_point("unlink", path)
        os.unlink(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if isinstance(exc, ModelpressError):
            raise
        raise io_error("removing", path, exc) from None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a folder and everything in it, never following a symbolic link out of it."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise UnsafeOutputError(f"{str(path)!r} is not a plain folder; refusing to remove it")
    try:
        fault_point("rmtree", path)
        shutil.rmtree(path)  # (rmtree itself unlinks links inside the tree rather than following them)
    except OSError as exc:
        if isinstance(exc, ModelpressError):
            raise
        raise io_error("removing folder", path, exc) from None


@contextmanager
def locked(path: str | os.PathLike, exclusive: bool, what: str = "lock file") -> Iterator[None]:
    """Hold flock(2) on `path` (created if missing; it must be a regular file, never a link) for the body:
    shared, or `exclusive`. Waits for the lock."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(
        os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.ELOOP, errno.EMLINK):
            raise NotRegularFileError(f"{what} {os.fspath(path)!r} is a folder or a symbolic link, not a file: remove "
                                      "it (modelpress recreates it)") from None
        raise io_error("opening", path, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{what} {os.fspath(path)!r} is not a regular file (a FIFO, device or socket): "
                                      "remove it (modelpress recreates it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as exc:  # e.g. ENOLCK: a file system without locks
            raise io_error("locking", path, exc) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
