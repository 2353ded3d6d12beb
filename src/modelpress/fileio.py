"""Every file modelpress reads or writes goes through this module.

Reads take regular files only, and never more than a stated bound: a path is opened with
O_NOFOLLOW | O_NONBLOCK (a symlink is refused, a FIFO cannot block us) and checked with fstat
before a byte is read, so a FIFO, a device or `/dev/zero` in place of a file is an error, not a
hang or an endless read.

Writes are atomic: a temporary sibling is written in full, fsynced, renamed (or hard-linked, when
an existing file must win) into place, and its folder fsynced. A failed fsync is never retried:
after one, the kernel may already have dropped the unwritten pages (PostgreSQL's fsync lesson),
so the operation fails, its temporary is removed, and nothing visible has changed.

Output folders (`--out`) are replaced only when that cannot destroy anything modelpress did not
write: see `check_output_dir`. A replacement is written beside the old folder and swapped in.

`fault_point(op, path, ...)` runs before every write-side system call. Tests install an injector
with `inject_faults(fn)` to raise ENOSPC or EIO, tear a write, or kill the process at that point;
nothing else ever sets it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from modelpress._libc import libc
from modelpress.errors import (
    LimitExceededError,
    ModelpressError,
    NotRegularFileError,
    StorageIOError,
    UnsafeOutputError,
)
from modelpress.limits import check_allocation

__all__ = [
    "STORE_MARKER",
    "CHECKPOINT_MARKER",
    "Injector",
    "fault_point",
    "inject_faults",
    "open_regular",
    "open_regular_sized",
    "read_file",
    "read_buffer",
    "write_file",
    "write_temp",
    "publish",
    "fsync_dir",
    "make_dirs",
    "remove_file",
    "remove_tree",
    "check_output_dir",
    "swap_in_dir",
    "locked",
]

STORE_MARKER = "STORE"  # the file that makes a folder a modelpress store (store/store.py writes it)
CHECKPOINT_MARKER = "modelpress.json"  # the manifest that makes a folder a modelpress checkpoint

# -- fault injection ------------------------------------------------------------------------------

Injector = Callable[..., None]
_injector: Injector | None = None


def fault_point(op: str, path: str | os.PathLike, fd: int | None = None, data: bytes | memoryview | None = None) -> None:
    """Called before each write-side operation (`op` is write, fsync, fsync_dir, rename, link, unlink,
    mkdir, rmtree or commit). Does nothing unless a test installed an injector, which may raise
    OSError, write part of `data` to `fd` and kill the process, or anything else a fault does."""
    if _injector is not None:
        _injector(op, os.fspath(path), fd, data)


@contextmanager
def inject_faults(injector: Injector) -> Iterator[None]:
    """Run the body with `injector(op, path, fd, data)` called at every fault point (tests only)."""
    global _injector
    previous, _injector = _injector, injector
    try:
        yield
    finally:
        _injector = previous


# -- reading ------------------------------------------------------------------------------------

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | os.PathLike, what: str) -> int:
    """A read-only descriptor of `path`, which must be a regular file (not a link, FIFO or device).

    Raises FileNotFoundError (the builtin: callers say what is missing in their own terms),
    NotRegularFileError, or StorageIOError.
    """
    return open_regular_sized(path, what)[0]


def open_regular_sized(path: str | os.PathLike, what: str) -> tuple[int, int]:
    """`open_regular`, and the file's size (from the same fstat)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symbolic link
            raise NotRegularFileError(f"{what} {os.fspath(path)!r} is a symbolic link; modelpress reads only "
                                      "regular files: replace it with the file itself") from None
        if exc.errno == errno.EISDIR:
            raise NotRegularFileError(f"{what} {os.fspath(path)!r} is a folder, not a file") from None
        raise StorageIOError(f"cannot open {what} {os.fspath(path)!r} ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(f"{what} {os.fspath(path)!r} is not a regular file (a FIFO, device or "
                                      "socket); replace it with the file itself")
        # (O_NONBLOCK is left set: it changes nothing for a regular file, and the store opens one per chunk)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def read_buffer(path: str | os.PathLike, limit: int, what: str) -> bytearray:
    """The whole of a regular file of at most `limit` bytes, in a new bytearray (no second copy: tensors may
    be views of it). The size is checked against `limit` and the memory available before allocating."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise LimitExceededError(f"{what} {os.fspath(path)!r} is {size} bytes, more than the {limit} "
                                     "a valid one can be; the file is corrupt or not what it claims")
        check_allocation(size, f"{what} {os.fspath(path)!r}")
        data = bytearray(size)
        view, got = memoryview(data), 0
        while got < size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                break
            got += n
        view.release()
        if got != size or os.read(fd, 1):
            raise StorageIOError(f"{what} {os.fspath(path)!r} changed size while it was read; try again")
        return data
    except OSError as exc:
        if isinstance(exc, ModelpressError):
            raise
        raise StorageIOError(f"cannot read {what} {os.fspath(path)!r} ({exc.strerror})") from None
    finally:
        os.close(fd)


def read_file(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The whole of a regular file of at most `limit` bytes (checked before reading)."""
    return bytes(read_buffer(path, limit, what))


# -- writing ------------------------------------------------------------------------------------


def _io_error(action: str, path: str | os.PathLike, exc: OSError) -> StorageIOError:
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
        raise _io_error("creating", tmp, exc) from None
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
        raise _io_error("writing", tmp, exc) from None
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
        raise _io_error("publishing", final, exc) from None
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
        raise _io_error("syncing folder", path, exc) from None


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
        raise _io_error("creating folder", path, exc) from None
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
        raise _io_error("removing", path, exc) from None


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
        raise _io_error("removing folder", path, exc) from None


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
        raise _io_error("opening", path, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{what} {os.fspath(path)!r} is not a regular file (a FIFO, device or socket): "
                                      "remove it (modelpress recreates it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as exc:  # e.g. ENOLCK: a file system without locks
            raise _io_error("locking", path, exc) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# -- output folders -------------------------------------------------------------------------------


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
    from modelpress.errors import OutputExistsError

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
        raise _io_error("replacing", out, exc) from None
    try:
        remove_tree(old)
    except OSError:
        pass  # the new folder is in place: a failed clean-up leaves the old one as a hidden sibling, no worse
