"""The load arena: one anonymous mapping that holds every tensor of a load, into which the payloads
of `aligned` chunk files can be mapped (copy-on-write, straight from the page cache) instead of
being copied.

Python's `mmap` object owns the address range; the tensors keep it alive (`torch.frombuffer`), and
when the last one goes it unmaps the whole range, mapped file pages included. Mapping a file at a
fixed address inside that range needs libc's `mmap(MAP_FIXED)`, called through ctypes; where that
is not available `can_map` is False and the loader copies those chunks instead.

Fresh anonymous memory costs a page fault per 4 KiB page on its first write, which in a virtual
machine can cost as much as decoding into it; the part of the arena the loader writes is
populated in one call instead (MAP_POPULATE). (Transparent huge pages were tried: several times
faster when a process reuses freed huge pages, but slower and erratic for a fresh process, which
is how models are usually loaded.)
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

from modelpress._libc import libc

__all__ = ["Arena", "PAGE", "can_map"]

PAGE = mmap.PAGESIZE
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _libc_mmap():
    """libc's mmap, or None where it cannot be called (not a POSIX system, no ctypes libc)."""
    if os.name != "posix" or not all(hasattr(mmap, f) for f in ("MAP_PRIVATE", "PROT_READ", "PROT_WRITE")):
        return None
    fn = getattr(libc(), "mmap", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    return fn


_MMAP = _libc_mmap() if ctypes.sizeof(ctypes.c_void_p) == 8 else None  # off_t is 64-bit on every 64-bit POSIX
_MAP_FIXED = 0x10 if os.name == "posix" and os.uname().sysname in ("Linux", "Darwin") else 0  # (not in Python's mmap)


def can_map() -> bool:
    """Whether file pages can be mapped into an arena here."""
    return _MMAP is not None and _MAP_FIXED != 0


class Arena:
    """`size` bytes of fresh memory as `tensor` (uint8) and `view`; bytes [0, written) will be written by the
    loader, the rest (page-aligned) is left for `map_file`."""

    def __init__(self, size: int, written: int):
        self.size = size
        if size == 0:
            self._mm = None
            self.tensor = torch.empty(0, dtype=torch.uint8)
            self.view = memoryview(bytearray())
            return
        populate = _POPULATE if written >= size else 0
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | populate)
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)  # keeps the mapping alive
        self.address = self.tensor.data_ptr()
        self.view = memoryview(self._mm)
        if 0 < written < size and _POPULATE and can_map():
            self._fixed(0, -(-written // PAGE) * PAGE, -1, 0, mmap.MAP_ANONYMOUS | _POPULATE)

    def map_file(self, offset: int, length: int, fd: int, file_offset: int) -> None:
        """Map `length` bytes of the file at `file_offset` (page-aligned) to arena bytes [offset, offset + length),
        copy-on-write: writes to the tensor never reach the file. (Its pages fault in as they are first read:
        measured faster here than populating them up front with MADV_POPULATE_READ.)"""
        self._fixed(offset, length, fd, file_offset, 0)

    def _fixed(self, offset: int, length: int, fd: int, file_offset: int, extra: int) -> None:
        if offset % PAGE or file_offset % PAGE or offset + length > self.size or length <= 0:
            raise ValueError("arena mappings must be page-aligned and inside the arena")
        want = self.address + offset
        got = _MMAP(want, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED | extra, fd,
                    file_offset)
        if got != want:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
