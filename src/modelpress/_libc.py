"""The C library through ctypes, loaded once: for the few calls Python does not wrap (mmap at a fixed
address for the store's load arena, malloc_trim after calibration blocks)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The process's C library (errno kept for ctypes.get_errno), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
