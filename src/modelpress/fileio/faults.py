"""The fault seam: `fault_point(op, path, ...)` runs before every write-side system call of fileio (and
before each store catalogue COMMIT). Tests install an injector with `inject_faults(fn)` to raise ENOSPC or
EIO, tear a write, or kill the process at that point; nothing else ever sets it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["Injector", "fault_point", "inject_faults"]

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
