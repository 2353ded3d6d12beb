"""Reads of regular files only, never more than a stated bound: a path is opened with O_NOFOLLOW |
O_NONBLOCK (a symlink is refused, a FIFO cannot block us) and checked with fstat before a byte is
read, so a FIFO, a device or `/dev/zero` in place of a file is an error, not a hang or an endless read."""

from __future__ import annotations

import errno
import os
import stat

from modelpress.errors import LimitExceededError, ModelpressError, NotRegularFileError, StorageIOError
from modelpress.limits import check_allocation

__all__ = ["open_regular", "open_regular_sized", "read_buffer", "read_file"]

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
